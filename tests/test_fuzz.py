"""Fuzzing every route of the real app under gunicorn (issue 4, point 5).

Hypothesis throws malformed and hostile input at /health, /setup, /predict, /webhook,
/versions, /jobs, /jobs/<id> and /metrics: arbitrary bytes, deeply nested JSON, huge
numbers, wrong types for every field, hostile XML label configs (billion laughs, external
entities), wrong content types, odd methods, path junk, query strings, bad auth headers,
oversized bodies and broken HTTP framing. Project 7 has a real trained model, so /predict's
path through the model store, the encoding cache and the real default encoder is fuzzed too.

The properties: no response is a 5xx (413 for oversized bodies), every error our app
answers is JSON with an "error" key, no traceback reaches the web log, and afterwards the
service still answers /health, /setup, /predict and /webhook correctly.

One server (redis-server + gunicorn with 2 workers) serves the whole module. Basic auth and
a webhook secret are switched on, so the auth layer is fuzzed as well; most generated
requests carry valid credentials so they reach the routes behind it.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

# Hypothesis keeps its example database and caches outside the repository.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "atl-hypothesis"))

import pytest  # noqa: E402
import requests  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from backend.model_store import version_number  # noqa: E402
from tests.support.prometheus_text import samples  # noqa: E402

CONFIG = ('<View><Text name="text" value="$text"/><Choices name="sentiment" toName="text">'
          '<Choice value="Positive"/><Choice value="Negative"/></Choices></View>')
LABELS = ["Positive", "Negative"]
PROJECT = 7  # the project with a trained model
USER, PASSWORD, SECRET = "fuzz-user", "fuzz-pass", "fuzz-webhook-secret"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
MAX_BODY_MB = 1
ROUTES = ["/health", "/setup", "/predict", "/webhook", "/versions", "/jobs", f"/jobs/{PROJECT}", "/metrics"]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "FOO"]

FUZZ = settings(
    max_examples=120,
    deadline=timedelta(seconds=20),  # a cold encoder or a busy 2-core box, not a hang
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the server ------------------------------------------------------------------------
def _train_model(data_dir: Path) -> str:
    """A real model version for PROJECT: a head on random 384-d vectors, the default encoder."""
    import numpy as np

    from backend.label_config import parse_label_config
    from backend.model_store import ModelStore
    from model.classifier import ClassifierHead, HeadConfig
    from model.encoder import encoder_id

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 384)).astype(np.float32)
    y = np.array([0, 1] * 6)
    head = ClassifierHead(HeadConfig(labels=LABELS, input_dim=384, hidden_dim=32, epochs=30)).fit(x, y)
    store = ModelStore(data_dir / "models")
    meta = {"label_config": parse_label_config(CONFIG).to_dict(), "encoder": encoder_id("default")}
    version = store.stage(PROJECT, head, meta)
    store.activate(PROJECT, version)
    return version


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tests.support.services import Services

    with Services(tmp_path_factory.mktemp("fuzz") / "data") as s:
        s.env.update(LABEL_STUDIO_URL="http://127.0.0.1:9", LABEL_STUDIO_API_KEY="not-a-token",
                     JOB_RETRIES="0", BASIC_AUTH_USER=USER, BASIC_AUTH_PASS=PASSWORD,
                     WEBHOOK_SECRET=SECRET, MAX_BODY_MB=str(MAX_BODY_MB))
        s.start_redis()
        s.model_version = _train_model(s.data_dir)
        s.start_web(workers=2)
        s.http = requests.Session()
        # Load the encoder in both gunicorn workers (two requests at once reach both).
        answers = []
        warm = [threading.Thread(target=lambda i=i: answers.append(_valid_predict(s, [f"warm up {i}"])))
                for i in range(2)]
        for thread in warm:
            thread.start()
        for thread in warm:
            thread.join()
        assert [a.status_code for a in answers] == [200, 200], s.log_tail("web.log")
        yield s


def _valid_predict(server, texts):
    tasks = [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)]
    return requests.post(server.url + "/predict",
                         json={"tasks": tasks, "project": f"{PROJECT}.1700000000", "label_config": CONFIG},
                         headers={"Authorization": AUTH}, timeout=120)


# -- sending and checking ----------------------------------------------------------------
class Raw:
    """A JSON fragment spliced verbatim into a body: numbers json.dumps cannot write, NaN..."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self):
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


def dumps(value) -> bytes:
    raws: list[str] = []

    def default(obj):
        if isinstance(obj, Raw):
            raws.append(obj.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(obj))

    text = json.dumps(value, default=default, allow_nan=True)  # ensure_ascii: surrogates stay \ud800
    for i, raw in enumerate(raws):
        text = text.replace(json.dumps(f"\x00raw{i}\x00"), raw, 1)
    return text.encode()


def send(server, method: str, path: str, body=None, *, content_type: str | None = "application/json",
         auth: str | None = AUTH, params=None):
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if auth is not None:
        headers["Authorization"] = auth
    return server.http.request(method, server.url + path, data=body, params=params, headers=headers,
                               timeout=60, allow_redirects=False)


def _parses(body: bytes) -> bool:
    try:
        json.loads(body)
        return True
    except (ValueError, RecursionError):
        return False


def check(response, method: str = "GET"):
    """The properties every answer must have."""
    status = response.status_code
    where = f"{method} {response.request.url[:200]} -> {status} {response.text[:300]!r}"
    assert status < 500, where
    if status >= 400 and method.upper() != "HEAD":
        if response.headers.get("Content-Type") == "text/html" and response.text.startswith("<html>"):
            return  # gunicorn's own answer to a request it cannot parse (400, 414 for a 5 kB URL...)
        assert response.headers.get("Content-Type", "").startswith("application/json"), where
        payload = response.json()
        assert isinstance(payload, dict) and isinstance(payload.get("error"), str) and payload["error"], where
        assert "Traceback" not in response.text, where


# -- strategies ------------------------------------------------------------------------
class Big(str):
    """A long string that prints short in Hypothesis's reports."""

    def __repr__(self):
        return f"Big({self[:12]!r} ... {len(self)} chars)"


any_text = st.text(st.characters(exclude_categories=()), max_size=30)  # lone surrogates too
huge_numbers = st.sampled_from([
    Raw(Big("1" + "0" * 5000)), Raw(Big("-" + "9" * 4400)), Raw("1e999999"), Raw("-1e999999"), Raw("1E-400"),
    Raw("123456789012345678901234567890"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("-0"),
    Raw("0.000000000000000000000000000001"), Raw("9007199254740993"),
])
hostile_strings = st.sampled_from([
    "", " ", "\x00", "\ud800", "\udfff\ud800", "²", "١٢", "７", "12.5", "-3", "0", "00", "1e400", Big("9" * 5000),
    " 7 ", "7abc", "7.", ".7", "+7", "0x7", "7\n", "‮7", "null", "None", "true", "[]", "{}",
    "../../etc/passwd", "%00", "$(reboot)", "<script>alert(1)</script>", "'; DROP TABLE x; --",
    "\r\nX-Injected: 1", Big("A" * 100_000),
])
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), any_text, huge_numbers, hostile_strings,
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=8,
)


def nested(depth: int, leaf="x", kind: str = "list") -> Raw:
    if kind == "list":
        return Raw("[" * depth + json.dumps(leaf) + "]" * depth)
    return Raw('{"a":' * depth + json.dumps(leaf) + "}" * depth)


deep_json = st.builds(nested, st.sampled_from([50, 500, 990, 3000, 100_000]),
                      kind=st.sampled_from(["list", "dict"]))
wild = st.one_of(json_values, deep_json, hostile_strings, huge_numbers)

valid_projects = st.sampled_from([PROJECT, str(PROJECT), f"{PROJECT}.1700000000", {"id": PROJECT},
                                  {"id": str(PROJECT)}, 3, "3.1700000000", {"id": 3}, 2**53])
hostile_projects = st.one_of(
    st.sampled_from([0, -1, -PROJECT, 2**53 + 1, 2**63, 10**100, 7.9, -7.5, True, False, None, [], [PROJECT], {},
                     {"id": None}, {"id": [PROJECT]}, {"id": {"id": 7}}, {"id": 10**100}, {"id": "²"}]),
    st.integers(), st.floats(), hostile_strings, huge_numbers, wild,
    st.builds(lambda v: {"id": v}, wild),
)
projects = st.one_of(valid_projects, hostile_projects)  # half valid, so the fields after it are reached

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(f'<!ENTITY lol{i + 1} "{("&lol" + (str(i) if i else "") + ";") * 10}">' for i in range(9))
    + ']><View><Text name="text" value="$text"/><Choices name="c" toName="text">'
      '<Choice value="&lol9;"/><Choice value="b"/></Choices></View>'
)
QUADRATIC_BLOWUP = (
    '<?xml version="1.0"?><!DOCTYPE q [<!ENTITY a "' + "a" * 50_000 + '">]><View>'
    + "&a;" * 2000 + "</View>"
)
XXE = [
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<View><Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="&x;"/>'
    '<Choice value="b"/></Choices></View>',
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Header>&x;</Header>'
    '<Text name="text" value="$text"/><Choices name="c" toName="text"><Choice value="a"/>'
    '<Choice value="b"/></Choices></View>',
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x SYSTEM "http://127.0.0.1:9/evil">]><View>&x;</View>',
    '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY % p SYSTEM "http://127.0.0.1:9/evil.dtd"> %p;]><View/>',
    '<?xml version="1.0"?><!DOCTYPE v SYSTEM "file:///etc/passwd"><View/>',
    '<?xml version="1.0"?><?xml-stylesheet href="http://127.0.0.1:9/x.xsl"?><View/>',
    '<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="file:///etc/passwd"/>',
]
HOSTILE_XML = [
    BILLION_LAUGHS, QUADRATIC_BLOWUP, *XXE,
    "<View>" * 20_000 + "</View>" * 20_000,
    "<View" + ' a="1"' * 5000 + "/>",
    CONFIG.replace("$text", "$"), CONFIG.replace("$text", "text"), CONFIG.replace('toName="text"', ""),
    CONFIG.replace("Positive", "Negative"), CONFIG.replace('name="sentiment"', ""),
    CONFIG.replace("<Choices", '<Choices choice="multiple"'), CONFIG.replace("<Text", "<HyperText"),
    CONFIG + CONFIG, CONFIG.replace("<View>", "<View><Labels name='l' toName='text'/>"),
    CONFIG.replace('value="Positive"', 'value="\ud800"'), "<View>\ud800</View>", "\x00<View/>",
    "<?xml version='1.0' encoding='utf-16'?><View/>", "<View><![CDATA[" + "x" * 1000 + "]]></View>",
    "<!-- -->", "<", "<View>", "</View>", "<a:b xmlns:a='x'/>", "&amp;", "<View>&unknown;</View>",
]


@st.composite
def xml_soup(draw):
    """Label-config-shaped XML with random tags, attributes and nesting."""
    tags = ["View", "Text", "HyperText", "Choices", "Choice", "Labels", "Header", "Image", draw(any_text)]

    def element(depth):
        tag = draw(st.sampled_from(tags))
        attrs = draw(st.dictionaries(st.sampled_from(["name", "value", "toName", "alias", "choice"]),
                                     st.one_of(st.sampled_from(["text", "$text", "$", "sentiment", "a",
                                                                "single", "multiple"]), any_text),
                                     max_size=3))
        children = "".join(element(depth + 1) for _ in range(draw(st.integers(0, 3 if depth < 3 else 0))))
        attr_text = "".join(f' {k}="{v}"' for k, v in attrs.items())
        return f"<{tag}{attr_text}>{children}</{tag}>"

    return element(0)


label_configs = st.one_of(st.just(CONFIG), st.sampled_from(HOSTILE_XML), xml_soup(), wild)

task_texts = st.one_of(
    any_text, st.text(max_size=200), hostile_strings, scalars, json_values,
    st.integers(0, 20_000).map(lambda n: Big("word " * n)),
)


@st.composite
def tasks(draw):
    """`tasks` for /predict: a valid list of tasks, a broken one, or something else entirely."""
    kind = draw(st.sampled_from(["good", "good", "broken", "not a list"]))
    if kind == "not a list":
        return draw(st.one_of(scalars, st.dictionaries(any_text, json_values, max_size=3), deep_json,
                              st.just({"data": {"text": "a task, not a list"}})))
    n = draw(st.integers(0, 4))
    out = []
    for _ in range(n):
        if kind == "good":
            task = {"id": draw(st.one_of(st.integers(), wild)), "data": {"text": draw(task_texts)}}
            if draw(st.booleans()):
                task["data"][draw(any_text)] = draw(json_values)
        else:
            task = draw(st.one_of(
                st.fixed_dictionaries({"id": wild, "data": wild}),
                st.fixed_dictionaries({"data": st.dictionaries(any_text.filter(lambda k: k != "text"),
                                                               json_values, max_size=3)}),
                st.fixed_dictionaries({"data": st.fixed_dictionaries({"text": wild})}),
                st.just({}), wild,
            ))
        out.append(task)
    return out


def maybe_fields(fixed: dict):
    """A dict with some of `fixed`'s fields present, each drawn from its strategy, plus extras."""
    return st.fixed_dictionaries({}, optional=fixed).flatmap(
        lambda d: st.dictionaries(any_text, wild, max_size=2).map(lambda extra: {**extra, **d}))


setup_payloads = maybe_fields({
    "project": projects, "schema": label_configs, "hostname": wild, "access_token": wild,
    "extra_params": wild,
})
predict_payloads = maybe_fields({
    "tasks": tasks(), "project": projects, "label_config": label_configs,
    "params": st.one_of(wild, st.fixed_dictionaries({"login": wild, "password": wild, "context": wild})),
    "model_version": wild,
})
actions = st.one_of(
    st.sampled_from(["ANNOTATION_CREATED", "ANNOTATIONS_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED",
                     "START_TRAINING", "TASKS_CREATED", "PROJECT_UPDATED", "annotation_created", ""]),
    wild,
)
webhook_payloads = maybe_fields({
    "action": actions, "project": projects,
    "annotation": st.one_of(wild, st.fixed_dictionaries({"id": wild, "project": projects, "result": wild,
                                                         "task": wild})),
    "annotations": wild, "task": wild,
})

good_auth = st.just(AUTH)
bad_auth = st.one_of(
    st.none(),
    st.sampled_from(["Basic", "Basic ", "Basic !!!", "Basic ====", "Bearer " + PASSWORD, "Digest x",
                     "basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
                     "Basic " + base64.b64encode(f"{USER}:wrong".encode()).decode(),
                     "Basic " + base64.b64encode(f"{USER}{PASSWORD}".encode()).decode(),
                     "Basic " + base64.b64encode(b"\xff\xfe:\x00").decode(), "Basic " + "A" * 3000]),
    st.binary(max_size=40).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip),  # sendable
)
auths = st.one_of(good_auth, good_auth, good_auth, bad_auth)  # mostly past the auth layer

content_types = st.one_of(st.sampled_from([
    None, "application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
    "application/json; charset=bogus", "text/plain", "application/x-www-form-urlencoded",
    "multipart/form-data", "multipart/form-data; boundary=zzz", "application/xml", "*/*", ";;;",
    "application/octet-stream", "application/json" + "; a=b" * 200,
]), st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30).map(str.strip))

path_junk = st.one_of(
    st.sampled_from(["/", "//", "/.", "/..", "/%2e%2e/", "/%00", "%00", ";x", ";", "/x", "/../../etc/passwd",
                     "?", "#", "/%ff%fe", "%", "%zz", "/" + "a" * 5000, "\\", "/./", "~"]),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=20),
)
paths = st.one_of(
    st.sampled_from(ROUTES),
    st.tuples(st.sampled_from(ROUTES), path_junk).map("".join),
    st.one_of(st.integers(), st.sampled_from(["0", "-1", "٣", "²", "1" * 30, "9" * 4000, "7.5", "7e3", "0x7",
                                              " 7", "７"]), st.text(max_size=10)).map(lambda v: f"/jobs/{v}"),
    path_junk.map(lambda p: "/" + p),
)
query_params = st.one_of(
    st.none(),
    st.dictionaries(st.sampled_from(["project", "secret", "format", "x"]) | st.text(max_size=8),
                    st.one_of(st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
                              st.sampled_from([SECRET, SECRET + "x", str(PROJECT), "²", "9" * 5000, "-1"])),
                    max_size=3),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=50),  # raw query string
)
bodies = st.one_of(
    st.none(), st.just(b""), st.binary(max_size=2000), json_values.map(dumps), deep_json.map(dumps),
    predict_payloads.map(dumps), st.text(max_size=200).map(lambda t: t.encode("utf-16")),
    st.text(max_size=200).map(lambda t: t.encode("latin-1", "replace")),
)


# -- route by route ----------------------------------------------------------------------
@FUZZ
@given(payload=setup_payloads, auth=auths)
def test_setup_never_fails_on_hostile_payloads(server, payload, auth):
    response = send(server, "POST", "/setup", dumps(payload), auth=auth)
    check(response, "POST")
    if response.status_code == 200:
        assert isinstance(response.json()["model_version"], str)


@settings(FUZZ, max_examples=150)
@given(payload=predict_payloads, auth=auths)
def test_predict_never_fails_on_hostile_payloads(server, payload, auth):
    response = send(server, "POST", "/predict", dumps(payload), auth=auth)
    check(response, "POST")
    if response.status_code == 200:
        results = response.json()["results"]
        assert isinstance(payload.get("tasks"), list) and len(results) == len(payload["tasks"])
        for r in results:
            if isinstance(r, list):  # a project without a model: nothing for Label Studio to store
                assert r == []
                continue
            assert isinstance(r["model_version"], str) and isinstance(r["result"], list)
            assert 0.0 <= r["score"] <= 1.0


@settings(FUZZ, max_examples=25)  # each example runs the real encoder: ~0.1-0.5 s here
@given(project=projects, texts=st.lists(task_texts, min_size=1, max_size=4))
def test_predict_with_the_trained_model_on_arbitrary_texts(server, project, texts):
    """Valid-shaped requests for the project with a model: unseen texts go through the encoder."""
    payload = {"tasks": [{"id": i, "data": {"text": t}} for i, t in enumerate(texts)], "project": project}
    response = send(server, "POST", "/predict", dumps(payload))
    check(response, "POST")
    if response.status_code == 200:
        assert len(response.json()["results"]) == len(texts)
    for where in ({"project": PROJECT}, {"project": f"{PROJECT}.1700000000"}):
        body = dumps({**payload, **where})
        response = send(server, "POST", "/predict", body)
        check(response, "POST")
        if not _parses(body):  # e.g. an integer of 5,000 digits, which Python's JSON refuses
            assert response.status_code == 400 and "must be JSON" in response.json()["error"]
            continue
        assert response.status_code == 200, response.text[:300]
        results = response.json()["results"]
        assert len(results) == len(texts)
        for r in results:
            assert r["model_version"] == server.model_version
            assert r["result"][0]["value"]["choices"][0] in LABELS
            assert 0.5 <= r["score"] <= 1.0


@FUZZ
@given(payload=webhook_payloads, auth=st.one_of(auths, st.none()),
       secret=st.one_of(st.none(), st.just(SECRET), st.just(SECRET), st.text(max_size=40),
                        st.just(SECRET + "x"), st.just(SECRET.upper())))
def test_webhook_never_fails_on_hostile_payloads(server, payload, auth, secret):
    params = {"secret": secret} if secret is not None else None
    response = send(server, "POST", "/webhook", dumps(payload), auth=auth, params=params)
    check(response, "POST")
    if response.status_code in (200, 201):
        assert response.json()["status"] in ("queued", "coalesced", "ignored")


@FUZZ
@given(path=st.sampled_from(["/versions", "/jobs", f"/jobs/{PROJECT}", "/metrics", "/health"]),
       params=query_params, body=st.one_of(st.none(), maybe_fields({"project": projects}).map(dumps), bodies),
       auth=auths)
def test_read_routes_never_fail_on_query_strings_and_bodies(server, path, params, body, auth):
    response = send(server, "GET", path, body, params=params, auth=auth)
    check(response, "GET")


@settings(FUZZ, max_examples=200)
@given(method=st.sampled_from(METHODS), path=paths, params=query_params, body=bodies,
       content_type=content_types, auth=auths)
def test_any_method_path_content_type_and_body(server, method, path, params, body, content_type, auth):
    try:
        response = send(server, method, path, body, params=params, content_type=content_type, auth=auth)
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL):
        return  # the client refuses to send it; nothing reached the server
    check(response, method)


# -- targeted cases ----------------------------------------------------------------------
def _deepest_parsed(server) -> int:
    """The deepest list nesting the server's JSON decoder accepts (bisection)."""
    low, high = 10, 5000  # parses, does not
    while high - low > 1:
        middle = (low + high) // 2
        error = send(server, "POST", "/setup", dumps({"project": nested(middle)})).json()["error"]
        low, high = (low, middle) if "nested too deeply" in error else (middle, high)
    return low


def test_json_nested_near_the_parsers_recursion_limit(server):
    """At and around the deepest nesting the decoder accepts, in every field.

    A value just shallow enough to parse must not blow the stack later (str(), logging...).
    """
    deepest = _deepest_parsed(server)
    assert 100 < deepest < 1000
    depths = range(deepest - 5, deepest + 2)  # shallower and far deeper: the fuzz tests above
    placements = {
        "/predict": [lambda d: d, lambda d: {"tasks": d, "project": PROJECT},
                     lambda d: {"tasks": [], "project": d},
                     lambda d: {"tasks": [{"id": d, "data": {}}], "project": PROJECT},
                     lambda d: {"tasks": [{"id": 1, "data": {"text": d}}], "project": PROJECT},
                     lambda d: {"tasks": [], "project": PROJECT, "params": d}],
        "/setup": [lambda d: {"project": PROJECT, "schema": d}, lambda d: {"project": d}],
        "/webhook": [lambda d: {"action": d, "project": PROJECT},
                     lambda d: {"action": "ANNOTATION_CREATED", "project": d},
                     lambda d: {"action": "ANNOTATION_CREATED", "annotation": {"project": d}}],
        "/versions": [lambda d: {"project": d}],
    }
    for depth in depths:
        for kind in ("list", "dict"):
            deep = nested(depth, kind=kind)
            for path, builders in placements.items():
                for build in builders:
                    method = "GET" if path == "/versions" else "POST"
                    check(send(server, method, path, dumps(build(deep))), method)


def test_hostile_xml_is_refused_quickly_and_reads_no_files(server):
    for i, xml in enumerate(HOSTILE_XML):
        started = time.monotonic()
        response = send(server, "POST", "/setup", dumps({"project": PROJECT, "schema": xml}))
        elapsed = time.monotonic() - started
        check(response, "POST")
        assert response.status_code in (200, 400), response.text[:300]
        assert elapsed < 2, f"{elapsed:.1f}s for {xml[:80]!r}"
        assert "root:" not in response.text  # /etc/passwd never comes back
        if i < 2 + len(XXE):  # entity expansion and external entities: refused
            assert response.status_code == 400, response.text[:300]


@FUZZ
@given(schema=label_configs)
def test_setup_with_a_valid_project_and_any_label_config(server, schema):
    response = send(server, "POST", "/setup", dumps({"project": f"{PROJECT}.1700000000", "schema": schema}))
    check(response, "POST")
    if response.status_code == 200:
        answer = response.json()
        assert answer["model_version"] == server.model_version
        if schema is None:  # no config to read: the version only
            assert answer == {"model_version": server.model_version}
            return
        assert set(answer) == {"model_version", "controls", "ignored_controls"}, answer
        # An accepted config has a control to learn; each ignored one says why.
        assert answer["controls"] and all(isinstance(c, str) for c in answer["controls"])
        assert all(isinstance(c.get("reason"), str) and c["reason"] for c in answer["ignored_controls"])


def test_oversized_bodies_get_413(server):
    big = b'{"tasks": [' + b'{"data": {"text": "x"}},' * (MAX_BODY_MB * 1024 * 1024 // 24 + 10) + b'{}]}'
    assert len(big) > MAX_BODY_MB * 1024 * 1024
    for path in ("/setup", "/predict", "/webhook", "/versions"):
        method = "GET" if path == "/versions" else "POST"
        for body in (big, iter([big[i:i + 65536] for i in range(0, len(big), 65536)])):  # sized, chunked
            try:
                response = send(server, method, path, body, params={"secret": SECRET})
            except requests.exceptions.ConnectionError:
                continue  # the server answered 413 and closed before the client sent it all
            check(response, method)
            assert response.status_code == 413, (path, response.status_code, response.text[:200])
        # Whatever the client saw, the server is still up.
        assert send(server, "GET", "/health").status_code == 200


def test_job_ids_in_the_path(server):
    for raw in ["0", "-1", "1" * 30, "9" * 4000, "٣", "²", "７", "7.5", "7e3", " 7", "%37", str(2**53 + 1)]:
        check(send(server, "GET", f"/jobs/{raw}"), "GET")
    assert send(server, "GET", f"/jobs/{PROJECT}").json()["model_version"] == server.model_version


def _raw_exchange(server, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


raw_header = st.one_of(
    st.sampled_from([
        b"Content-Length: -1", b"Content-Length: abc", b"Content-Length: 99999999999999999999",
        b"Content-Length: 5\r\nContent-Length: 7", b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: chunked\r\nContent-Length: 3", b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: identity", b"Expect: 100-continue", b"Expect: nonsense",
        b"Content-Type: application/json", b"Authorization: " + AUTH.encode(), b"Host:", b"Host: a b",
        b"X-Forwarded-For: ::1, evil", b"Connection: upgrade\r\nUpgrade: websocket", b": empty name",
        b"Bad Header Name: x", b"X-Long: " + b"a" * 10000, b"X-Bin: \x00\xff",
    ]),
    st.binary(max_size=60),
)


@settings(FUZZ, max_examples=120)
@given(method=st.sampled_from([b"GET", b"POST", b"get", b"G E T", b"", b"\x00", b"POST" * 20]),
       target=st.one_of(st.sampled_from([r.encode() for r in ROUTES]), st.binary(max_size=40),
                        st.sampled_from([b"*", b"http://evil/predict", b"/predict?" + b"a" * 5000, b"/ /"])),
       version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/0.9", b"HTTP/2.0", b"HTTP/9.9", b"", b"FOO"]),
       headers=st.lists(raw_header, max_size=4), body=st.one_of(st.just(b""), st.binary(max_size=200),
                                                               st.just(b"5\r\n{}\r\n0\r\n\r\n")))
def test_broken_http_framing(server, method, target, version, headers, body):
    """Bytes on the socket: gunicorn or the app must answer with a status below 500."""
    request = b" ".join(p for p in (method, target, version) if p) + b"\r\n"
    request += b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    answer = _raw_exchange(server, request)
    if not answer:
        return  # the connection closed without an answer: nothing was served
    while True:
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line.startswith(b"HTTP/"), answer[:200]
        status = int(status_line.split()[1])
        if status >= 200 or b"\r\n\r\n" not in answer:
            break
        answer = answer.split(b"\r\n\r\n", 1)[1]  # skip an interim answer (100 Continue)
        if not answer:
            return
    if status == 501 and b"Unsupported transfer coding" in answer:
        return  # gunicorn's RFC 9112 answer to a transfer coding it does not implement
    assert status < 500, answer[:500]


# -- afterwards ----------------------------------------------------------------------------
def test_the_service_still_answers_correctly_afterwards(server):
    """Runs last in this module: the fuzzing left the service healthy and correct."""
    assert server.web.poll() is None, "gunicorn died"
    health = server.http.get(server.url + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "UP"

    setup = send(server, "POST", "/setup", dumps({"project": f"{PROJECT}.1700000000", "schema": CONFIG,
                                                  "hostname": "http://ls", "access_token": "x",
                                                  "extra_params": {}}))
    assert setup.status_code == 200 and setup.json() == {"model_version": server.model_version,
                                                         "controls": ["sentiment"], "ignored_controls": []}

    texts = ["a wonderful, moving film", "dull and far too long", "after the fuzzing"]
    predict = _valid_predict(server, texts)
    assert predict.status_code == 200, predict.text
    results = predict.json()["results"]
    assert len(results) == 3
    for r in results:
        assert r["model_version"] == server.model_version
        assert r["result"][0]["from_name"] == "sentiment" and r["result"][0]["to_name"] == "text"
        assert r["result"][0]["value"]["choices"][0] in LABELS
        assert 0.5 <= r["score"] <= 1.0
    # The same texts, now cached, give the same predictions.
    assert _valid_predict(server, texts).json()["results"] == results

    untrained = send(server, "POST", "/predict", dumps({"tasks": [{"data": {"text": "x"}}], "project": 4242}))
    assert untrained.json() == {"results": [[]]}

    project = 4243  # fresh: no job of it queued by the fuzzing
    hook = send(server, "POST", "/webhook", dumps({"action": "ANNOTATION_CREATED", "project": {"id": project},
                                                   "annotation": {"id": 1, "project": project}}),
                auth=None, params={"secret": SECRET})
    assert hook.status_code == 201 and hook.json()["status"] == "queued", hook.text
    again = send(server, "POST", "/webhook", dumps({"action": "START_TRAINING", "project": {"id": project}}))
    assert again.status_code == 200 and again.json() == {"status": "coalesced", "job_id": hook.json()["job_id"],
                                                         "project": project}
    jobs = send(server, "GET", f"/jobs/{project}").json()
    assert jobs["waiting"] == hook.json()["job_id"] and jobs["requested"] == 1

    assert send(server, "POST", "/webhook", dumps({"action": "START_TRAINING", "project": 1}),
                auth=None).status_code == 401
    metrics = send(server, "GET", "/metrics")
    assert metrics.status_code == 200
    series = samples(metrics.text)
    assert series[("atl_redis_up", ())] == 1
    assert series[("atl_model_version_number", (("model_version", server.model_version), ("project", str(PROJECT))))] \
        == version_number(server.model_version)

    log = (server.data_dir / "web.log").read_text(errors="replace")
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log, log[-4000:]
