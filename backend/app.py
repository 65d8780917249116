"""The WSGI app Label Studio talks to: /health, /setup, /predict, /webhook, /versions, /metrics.

`create_app(settings)` builds it; nothing is loaded at import time. gunicorn, the tests and
the command line all build it the same way (`backend.wsgi:app`).

/health and /setup must answer in milliseconds: Label Studio calls both before every predict
batch, with 1 s and 3 s timeouts. They never load a model nor call Label Studio.
/webhook only enqueues (Label Studio gives it 1 s and never retries).
"""

from __future__ import annotations

import hmac
import logging
import time

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend import metrics
from backend.job_queue import JobQueue, key, redis_connection
from backend.label_config import UnsupportedConfig, parse_label_config
from backend.ml_backend import UNTRAINED, ActiveLearningBackend, BadRequest, project_id_from_ls
from backend.model_store import ModelStore
from backend.pages import pages_blueprint
from backend.settings import Settings
from model.encoding_cache import EncodingCache

log = logging.getLogger(__name__)

# Events that change the annotations a model learns from.
TRAIN_EVENTS = {
    "ANNOTATION_CREATED",
    "ANNOTATIONS_CREATED",
    "ANNOTATION_UPDATED",
    "ANNOTATIONS_DELETED",
    "START_TRAINING",
}
# New tasks: encode them in the background before anyone labels them.
ENCODE_EVENTS = {"TASKS_CREATED"}
# A project update may bring a new label config: a project whose config a retrain refused
# is retrained once it changed (`JobQueue.config_updated`).
CONFIG_EVENTS = {"PROJECT_UPDATED"}


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_mb * 1024 * 1024
    store = ModelStore(settings.models_dir)
    state: dict = {}

    def cache() -> EncodingCache:
        if "cache" not in state:
            state["cache"] = EncodingCache(settings.encoding_cache_path)
        return state["cache"]

    def queue() -> JobQueue:
        if "queue" not in state:
            if not settings.redis_url:
                raise ServiceUnavailable("REDIS_URL is not set; start the backend with `make serve`")
            state["queue"] = JobQueue(redis_connection(settings.redis_url, fast_fail=True), settings)
        # After a failure, skip Redis for a second: a dead Redis costs no time per request.
        if time.monotonic() < state.get("redis_down_until", 0):
            raise ServiceUnavailable("the job queue (Redis) is unavailable; the event was not queued")
        return state["queue"]

    def redis_failed() -> None:
        state["redis_down_until"] = time.monotonic() + 1.0

    # Projects this process knows /setup has seen: /setup then costs no Redis call at all.
    seen_projects: set[int] = set()

    def first_connection(project_id: int) -> None:
        """A project /setup has never seen (no model yet, no mark in Redis): queue the
        encoding of its tasks now, so the retrain after its first annotation finds them
        cached. One SET NX per project and process; a Redis fault only skips this."""
        if project_id in seen_projects:
            return
        if store.current_version(project_id) is not None:
            seen_projects.add(project_id)
            return
        try:
            q = queue()
            if q.redis.set(key(project_id, "connected"), time.time(), nx=True):
                status, job_id = q.request_encode(project_id)
                log.info("project=%s connected for the first time: encoding its tasks %s job=%s",
                         project_id, status, job_id)
            seen_projects.add(project_id)
        except ServiceUnavailable as exc:  # no Redis, or it failed within the last second
            log.debug("project=%s /setup did not queue the encoding of its tasks: %s", project_id, exc)
        except Exception as exc:  # Redis down: /setup answers all the same
            redis_failed()
            log.warning("project=%s /setup could not queue the encoding of its tasks: %s", project_id, exc)

    @app.before_request
    def authenticate():
        if request.path == "/health" or (request.path != "/webhook" and not settings.basic_auth_user):
            return None
        auth = request.authorization
        basic = (auth.username or "", auth.password or "") if auth is not None and auth.type == "basic" else None
        if request.path == "/webhook":
            if webhook_allowed(settings, request.args.get("secret", ""), basic):
                return None
            if not settings.basic_auth_user:
                return jsonify(error="this webhook URL needs ?secret=<WEBHOOK_SECRET>"), 401
        if settings.basic_auth_user:
            if basic is None or not basic_auth_matches(settings, *basic):
                response = jsonify(error="authentication required (HTTP Basic, the backend's "
                                         "BASIC_AUTH_USER / BASIC_AUTH_PASS)")
                response.status_code = 401
                response.headers["WWW-Authenticate"] = 'Basic realm="atl-backend"'
                return response
        return None

    def body() -> dict:
        payload = _json_or_none()
        if payload is None:
            raise BadRequest("the request body must be JSON")
        if not isinstance(payload, dict):
            raise BadRequest("the request body must be a JSON object")
        return payload

    app.register_blueprint(pages_blueprint(settings, store, queue))  # / and /projects/<id>

    @app.get("/health")
    def health():
        return jsonify(status="UP", model_class="ActiveTransferLearning")

    @app.post("/setup")
    def setup():
        payload = body()
        project_id = project_id_from_ls(payload.get("project"))
        schema = payload.get("schema")
        answer = {"model_version": store.current_version(project_id) or UNTRAINED}
        if schema is not None:
            try:
                config = parse_label_config(schema)
            except UnsupportedConfig as exc:
                return refused_setup(str(exc))
            # What the backend learns of the config, and what it leaves alone (TextArea, ...).
            answer["controls"] = [c.name for c in config.controls]
            answer["ignored_controls"] = config.ignored_summary
        first_connection(project_id)
        return jsonify(**answer)

    @app.post("/predict")
    def predict():
        started = time.perf_counter()
        payload = body()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest("'tasks' must be a list of task objects")
        project_id = project_id_from_ls(payload.get("project"))
        backend = ActiveLearningBackend(settings, project_id, store=store, cache=cache())
        params = payload.get("params")
        context = params.get("context") if isinstance(params, dict) else None
        results = backend.predict(tasks, context=context)
        metrics.observe_predict(time.perf_counter() - started)
        return jsonify(results=results)

    @app.post("/webhook")
    def webhook():
        payload = body()
        action = payload.get("action")
        if not isinstance(action, str) or not action:
            raise BadRequest("missing 'action': a Label Studio webhook names its event in 'action'")
        if action not in TRAIN_EVENTS | ENCODE_EVENTS | CONFIG_EVENTS:
            return jsonify(status="ignored", action=action)
        project_id = project_id_from_ls(webhook_project(payload))
        project = payload.get("project")
        label_config = project.get("label_config") if isinstance(project, dict) else None
        label_config = label_config if isinstance(label_config, str) else None
        if action in CONFIG_EVENTS and label_config is None:  # nothing to compare: no Redis call
            return jsonify(status="ignored", action=action)
        try:
            if action in ENCODE_EVENTS:
                status, job_id = queue().request_encode(project_id)
            elif action in CONFIG_EVENTS:
                status, job_id = queue().config_updated(project_id, label_config)
                if status == "ignored":
                    return jsonify(status="ignored", action=action)
            else:
                status, job_id = queue().request_retrain(project_id, action, label_config)
        except ServiceUnavailable:
            raise
        except Exception as exc:  # Redis down or timing out
            redis_failed()
            log.error("project=%s webhook %s could not be queued: %s", project_id, action, exc)
            raise ServiceUnavailable("the job queue (Redis) is unavailable; the event was not queued") from None
        # A burst of annotations is one queued retrain and many coalesced events: only the
        # queued one is worth a line at INFO (the coalesced count is in /jobs and /metrics).
        # A refusal is worth a line too: it answers "why does it not retrain?".
        log.log(logging.INFO if status in ("queued", "refused") else logging.DEBUG,
                "project=%s webhook %s -> %s job=%s", project_id, action, status, job_id)
        return jsonify(status=status, job_id=job_id, project=project_id), 201 if status == "queued" else 200

    @app.get("/versions")
    def versions():
        payload = _json_or_none() or {}
        project = request.args.get("project") or (payload.get("project") if isinstance(payload, dict) else None)
        project_id = project_id_from_ls(project)
        return jsonify(versions=store.versions(project_id),
                       current=store.current_version(project_id))

    @app.get("/jobs")
    def jobs():
        q = _queue_or_503(queue)
        ids = sorted(set(q.project_ids()) | set(store.projects()))
        return jsonify(projects=[q.project_status(pid) for pid in ids])

    @app.get("/jobs/<int:project_id>")
    def project_jobs(project_id: int):
        project_id = project_id_from_ls(project_id)  # the same range as everywhere: a huge id is no file name
        q = _queue_or_503(queue)
        return jsonify(q.project_status(project_id) | {"model_version": store.current_version(project_id)})

    def queue_or_none() -> JobQueue | None:
        try:
            return queue()
        except ServiceUnavailable:
            return None

    metrics_registry = metrics.registry(store, queue_or_none)

    @app.get("/metrics")
    def metrics_route():
        return Response(generate_latest(metrics_registry), content_type=CONTENT_TYPE_LATEST)

    @app.errorhandler(BadRequest)
    def bad_request(exc):
        log.warning("400 %s %s: %s", request.method, request.path, exc)
        return jsonify(error=str(exc)), 400

    @app.errorhandler(ServiceUnavailable)
    def unavailable(exc):
        return jsonify(error=str(exc)), 503

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return jsonify(error=exc.description or exc.name), exc.code

    @app.errorhandler(Exception)
    def unexpected(exc):
        log.exception("500 %s %s", request.method, request.path)
        return jsonify(error="internal error; see the backend's log"), 500

    return app


class ServiceUnavailable(RuntimeError):
    pass


def refused_setup(reason: str) -> Response:
    """400 for a label config /setup refuses, with the reason in the status line too.

    Label Studio (ml/api_connector.py, `MLApi._request`) calls `raise_for_status()` and keeps
    only `str(error)`: "400 Client Error: <reason phrase> for url: ...". The body never reaches
    the user; the reason phrase does, into the connection dialog ("Reason: ...",
    ml/serializers.py) and the model card's error (ml/models.py, `update_state`).
    """
    log.warning("400 POST /setup: %s", reason)
    response = jsonify(error=reason)
    response.status = f"400 {reason_phrase(reason)}"
    return response


def reason_phrase(reason: str) -> str:
    """`reason` as an HTTP reason phrase: one line of printable ASCII (RFC 9112, which
    gunicorn enforces), without angle brackets, which Label Studio's screen would take for
    HTML tags."""
    phrase = " ".join(reason.split()).replace("<", "").replace(">", "")
    return "".join(c if " " <= c <= "~" else "?" for c in phrase)[:600]


def _queue_or_503(factory):
    try:
        q = factory()
        q.redis.ping()
        return q
    except ServiceUnavailable:
        raise
    except Exception:
        raise ServiceUnavailable("the job queue (Redis) is unavailable") from None


def basic_auth_matches(settings: Settings, username: str, password: str) -> bool:
    return (hmac.compare_digest(username.encode(), settings.basic_auth_user.encode())
            and hmac.compare_digest(password.encode(), settings.basic_auth_pass.encode()))


def webhook_allowed(settings: Settings, secret: str, basic: tuple[str, str] | None) -> bool:
    """Whether a /webhook request may pass: `secret` from its URL, `basic` its Basic credentials.

    Label Studio's auto-created webhook sends no auth header: the secret rides in its URL
    (/webhook?secret=...). Label Studio's own START_TRAINING call to /webhook carries Basic
    auth instead, so either is accepted.
    """
    if settings.webhook_secret and secret and hmac.compare_digest(secret.encode(), settings.webhook_secret.encode()):
        return True
    if settings.basic_auth_user:
        return basic is not None and basic_auth_matches(settings, *basic)
    return not settings.webhook_secret


def _json_or_none():
    """The request body as JSON, None when it is not JSON.

    Python's decoder raises RecursionError (not ValueError) on nesting deeper than the
    recursion limit, which Flask's `silent` does not cover: that is a client error too.
    """
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        # A streamed (chunked) body is cut at the limit without an error; werkzeug would
        # raise 413 only on a further read, so without this it surfaced as "not JSON".
        raise RequestEntityTooLarge()
    try:
        return request.get_json(silent=True, force=True)
    except RecursionError:
        raise BadRequest("the request body is JSON nested too deeply") from None


def webhook_project(payload: dict):
    project = payload.get("project")
    if project is None:
        annotation = payload.get("annotation")
        if isinstance(annotation, dict):
            project = annotation.get("project")
    return project
