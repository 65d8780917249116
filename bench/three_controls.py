"""The three-control layout of the speed benchmarks (issue 13, point 6).

One text, three questions about it: the sentiment (single-choice, the corpora's own label),
its length (single-choice) and its tone (multi-label), so every kind of head a project can
bring is there. The length and tone answers are read off the text itself (word count,
punctuation): every task gets an answer to all three without a second annotator, and a head
can learn them from the encoder's vector about as well as a sentiment head learns sentiment,
so the out-of-fold passes find errors to learn from, as in a real project.

`bench_freshness.py --three-controls` and `bench_orderings.py --controls 3` use it.
"""

from __future__ import annotations

import numpy as np

CONFIG = """<View>
  <Text name="text" value="$text"/>
  <Choices name="sentiment" toName="text" choice="single">
    <Choice value="Positive"/>
    <Choice value="Negative"/>
  </Choices>
  <Choices name="length" toName="text" choice="single">
    <Choice value="Short"/>
    <Choice value="Long"/>
  </Choices>
  <Choices name="tone" toName="text" choice="multiple">
    <Choice value="Question"/>
    <Choice value="Exclamation"/>
    <Choice value="Plain"/>
  </Choices>
</View>"""

# Median word count of the airline tweets (20) and movie snippets (18): both classes are common.
LONG_WORDS = 18


def answers(text: str, sentiment: str) -> dict:
    """Control name -> the answer to each of the three questions (`LabelConfig.results_for`'s
    input). `sentiment` is the corpus label; the others come from `text`."""
    tone = [name for name, mark in (("Question", "?"), ("Exclamation", "!")) if mark in text]
    return {"sentiment": sentiment,
            "length": "Long" if len(text.split()) > LONG_WORDS else "Short",
            "tone": tone or ["Plain"]}


def control_specs():
    """The three controls as `model.heads.ControlSpec`s over the one text object."""
    from backend.label_config import parse_label_config
    from model.heads import ControlSpec

    return [ControlSpec(name=c.name, labels=list(c.choices), multi_label=c.multi_label, inputs=list(c.to_names))
            for c in parse_label_config(CONFIG).controls]


def targets(texts: list[str], sentiments: list[str]) -> list[np.ndarray]:
    """Per control, the target array over `texts` (`model.heads.encode_targets`)."""
    from model.heads import encode_targets

    rows = [answers(t, s) for t, s in zip(texts, sentiments)]
    return [encode_targets(spec, [row[spec.name] for row in rows]) for spec in control_specs()]
