# The simulator scenarios' data and sizes, in one place: sourced by
# bench/simulate_scenarios.sh (the simulator) and bench/peer_scenarios.sh (the small-text
# peer), so both run exactly the same setups. `scenario_args NAME` sets SCENARIO_ARGS to the
# scenario's options (what each one is: the header of bench/simulate_scenarios.sh), or
# returns 2 for an unknown name.

SCENARIO_NAMES="in_domain_binary, in_domain_three_class, domain_shift, domain_shift_reverse, rare_minority,
multi_label, two_controls, fashion_mnist, multi_label_500, two_controls_500, fashion_mnist_500, many_class"

scenario_args() {
    local sentiment=(--pool-size 3000 --test-size 2000 --batch-size 50 --budget 500 --report-at 100,200,300,500)
    case $1 in
        in_domain_binary)      SCENARIO_ARGS=(--data builtin:airline --initial 50 "${sentiment[@]}") ;;
        in_domain_three_class) SCENARIO_ARGS=(--data builtin:airline3 --initial 50 "${sentiment[@]}") ;;
        domain_shift)          SCENARIO_ARGS=(--data builtin:airline --seed-data builtin:movies --initial 1000
                                              "${sentiment[@]}") ;;
        domain_shift_reverse)  SCENARIO_ARGS=(--data builtin:movies --seed-data builtin:airline --initial 1000
                                              "${sentiment[@]}") ;;
        rare_minority)         SCENARIO_ARGS=(--data builtin:airline --rare-class Positive:0.05 --initial 50
                                              "${sentiment[@]}") ;;
        multi_label)           SCENARIO_ARGS=(--data builtin:debian_use --initial 25 --pool-size 500
                                              --test-size 500 --batch-size 25 --budget 100 --report-at 50,75,100) ;;
        two_controls)          SCENARIO_ARGS=(--data builtin:debian_role_language --initial 20 --pool-size 400
                                              --test-size 400 --batch-size 20 --budget 80 --report-at 40,60,80) ;;
        fashion_mnist)         SCENARIO_ARGS=(--data builtin:fashion_mnist:2000 --test builtin:fashion_mnist_test:1000
                                              --pool-size 500 --initial 20 --batch-size 20 --budget 100
                                              --report-at 40,60,80,100) ;;
        # Issue 17, point 6 asks for random's 500-label accuracy, which the three scenarios above
        # never reach: the same data run to 500 labels with the text scenarios' grid (50 random
        # to start, batches of 50). Debian: 3,000 of debian_use's 3,562 descriptions per seed;
        # Fashion-MNIST: pools of 1,500 from the same fixed 2,000 images (already encoded).
        multi_label_500)       SCENARIO_ARGS=(--data builtin:debian_use --initial 50 --pool-size 2000
                                              --test-size 1000 --batch-size 50 --budget 500 --report-at 100,200,300,500) ;;
        two_controls_500)      SCENARIO_ARGS=(--data builtin:debian_role_language --initial 50 --pool-size 2000
                                              --test-size 1000 --batch-size 50 --budget 500 --report-at 100,200,300,500) ;;
        fashion_mnist_500)     SCENARIO_ARGS=(--data builtin:fashion_mnist:2000 --test builtin:fashion_mnist_test:1000
                                              --pool-size 1500 --initial 50 --batch-size 50 --budget 500
                                              --report-at 100,200,300,500) ;;
        # Issue 17, point 3: margin against least confidence on many-class text. 1,500 + 1,000
        # of debian_works_with's 2,554 descriptions per seed, the text scenarios' grid.
        many_class)            SCENARIO_ARGS=(--data builtin:debian_works_with --initial 50 --pool-size 1500
                                              --test-size 1000 --batch-size 50 --budget 500 --report-at 100,200,300,500) ;;
        *) echo "unknown scenario $1 (one of: $SCENARIO_NAMES)" >&2; return 2 ;;
    esac
}
