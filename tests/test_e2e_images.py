"""End to end with an image classification project: `<Image>` + `<Choices>`, one single-choice
and one multi-label control.

A real Label Studio 1.23.2, the backend under gunicorn and a real rq worker. The images are
real photos and textures (scikit-image's sample data), uploaded to Label Studio itself as
files, plus one task whose image does not exist. A few are annotated through the API; the
retrain must publish a version with one prediction per good task, report the broken one in
/jobs (and give it no prediction), and order the queue by the model, not by task id.
"""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest
import requests

from backend.images import ImageFetcher
from backend.model_store import version_number
from tests.support.ls_project import jobs_of, wait_until_idle
from tests.test_image_encoder import sample_photo

pytestmark = pytest.mark.e2e

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="kind" toName="image" choice="single-radio" required="true">
    <Choice value="Photo"/>
    <Choice value="Texture"/>
  </Choices>
  <Choices name="look" toName="image" choice="multiple">
    <Choice value="Gray"/>
    <Choice value="Wide"/>
    <Choice value="Other"/>
  </Choices>
</View>"""

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
TEXTURES = ("brick.png", "grass.png", "gravel.png", "chessboard_RGB.png")
GRAY = {"brick.png", "grass.png", "gravel.png"}
WIDE = {"chelsea.png", "coffee.png"}  # wider than tall by half or more


def look(name: str) -> list[str]:
    """The multi-label answer: what the sample image looks like."""
    return [tag for tag, names in (("Gray", GRAY), ("Wide", WIDE)) if name in names] or ["Other"]


def variants(name: str) -> list[bytes]:
    """Three JPEG files of one sample image: the whole (at most 320 px), mirrored, the centre."""
    from PIL import Image, ImageOps

    image = Image.open(io.BytesIO(sample_photo(name))).convert("RGB")
    image.thumbnail((320, 320))
    w, h = image.size
    shown = [image, ImageOps.mirror(image), image.crop((w // 8, h // 8, w - w // 8, h - h // 8))]
    files = []
    for picture in shown:
        out = io.BytesIO()
        picture.save(out, "JPEG", quality=90)
        files.append(out.getvalue())
    return files


@pytest.mark.parametrize("fine_tune_layers", [0, 1], ids=["frozen", "fine-tuned"])
def test_an_image_project_learns_from_uploaded_images_and_reports_a_broken_one(label_studio, services,
                                                                               fine_tune_layers):
    """Frozen, and with FINE_TUNE_LAYERS=1: the top block of the image network trains with the
    heads, is saved with the version, and /predict answers with it."""
    from label_studio_sdk.client import LabelStudio

    services.env.update(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=label_studio.api_key,
                        FINE_TUNE_LAYERS=str(fine_tune_layers))
    services.start_web()
    services.start_worker()
    client = LabelStudio(base_url=label_studio.url, api_key=label_studio.api_key)
    project = client.projects.create(title=f"images {time.time():.0f}", label_config=CONFIG)

    # Upload the files to Label Studio (the SDK's import_tasks sends JSON only; a file upload
    # is the same endpoint, multipart): one task per file, its value /data/upload/<project>/...
    kind_of_file, files = {}, []
    for kind, names in (("Photo", PHOTOS), ("Texture", TEXTURES)):
        for name in names:
            for k, data in enumerate(variants(name)):
                filename = f"{name.split('.')[0]}-{k}.jpg"
                kind_of_file[filename] = (kind, name, k)
                # One form field per file: Label Studio reads one file per field name.
                files.append((f"file{len(files)}", (filename, data, "image/jpeg")))
    token = ImageFetcher(label_studio_url=label_studio.url, api_key=label_studio.api_key)._authorization()
    response = httpx.post(f"{label_studio.url}/api/projects/{project.id}/import",
                          headers={"Authorization": token}, files=files, timeout=120)
    assert response.status_code == 201, response.text
    # And one task whose image is not there (moved or deleted in the storage).
    client.projects.import_tasks(id=project.id, request=[{"image": f"/data/upload/{project.id}/gone.jpg"}])

    tasks = {t["id"]: t for t in (t.model_dump(mode="json") for t in
                                   client.tasks.list(project=project.id, fields="all", page_size=100))}
    assert len(tasks) == len(files) + 1
    broken = next(i for i, t in tasks.items() if t["data"]["image"].endswith("/gone.jpg"))

    def truth(task_id: int):
        # Label Studio prefixes an uploaded file's name with a random id: "<8 hex>-<name>".
        stored = tasks[task_id]["data"]["image"].rsplit("/", 1)[-1].split("-", 1)[1]
        return kind_of_file[stored]

    client.ml.create(url=services.url, project=project.id, title="Active Transfer Learning",
                     is_interactive=False, extra_params={"batch_size": 4})
    # Before the first annotation: the encoding at connection publishes the cold start, the
    # k-means order over the image vectors, with no guess (a choice name's text vector says
    # nothing about an image network's) and no prediction for the broken task.
    deadline = time.monotonic() + 300
    while not ((encode := jobs_of(services, project.id).get("last_encode")) and encode.get("status") == "finished"):
        assert time.monotonic() < deadline, f"no encoding finished: {jobs_of(services, project.id)}"
        time.sleep(1)
    cold = encode["cold_start"]
    assert cold["model_version"] == "cold-start-1" and cold["prefilled_controls"] == [], cold
    assert cold["tasks"] == len(files) and cold["order"] == "kmeans", cold
    assert client.projects.get(id=project.id).model_version == "cold-start-1"
    cold_scores = {}
    for task in client.tasks.list(project=project.id, fields="all", page_size=100):
        task = task.model_dump(mode="json")
        mine = [p for p in task["predictions"] if p["model_version"] == "cold-start-1"]
        assert len(mine) == (0 if task["id"] == broken else 1), (task["id"], task["predictions"])
        if mine:
            assert mine[0]["result"] == [] and 0 <= mine[0]["score"] < 0.9, mine
            cold_scores[task["id"]] = mine[0]["score"]
    assert len(set(cold_scores.values())) == len(files)
    assert sorted(cold_scores, key=cold_scores.get) != sorted(cold_scores), "the cold start is id order"
    # The first variant of each sample image is annotated, the mirrored and cropped ones not.
    labeled = sorted(i for i in tasks if i != broken and truth(i)[2] == 0)
    assert len(labeled) == len(PHOTOS) + len(TEXTURES)
    for task_id in labeled:
        kind, name, _ = truth(task_id)
        client.annotations.create(id=task_id, result=[
            {"from_name": "kind", "to_name": "image", "type": "choices", "value": {"choices": [kind]}},
            {"from_name": "look", "to_name": "image", "type": "choices", "value": {"choices": look(name)}}])

    deadline = time.monotonic() + 300
    while version_number(client.projects.get(id=project.id).model_version or "") < 1:
        assert time.monotonic() < deadline, f"no model version; jobs: {jobs_of(services, project.id)}\n" \
                                             f"{services.log_tail('worker.log')}"
        time.sleep(1)
    jobs = wait_until_idle(services, project.id)
    version = client.projects.get(id=project.id).model_version

    # The broken image is reported, by task, in the encoding job and in the retrain; the
    # rest trained on every annotation.
    last, encode = jobs["last"], jobs["last_encode"]
    assert last["status"] == "finished" and last["model_version"] == version, last
    assert last["labeled"] == len(labeled) and last["tasks"] == len(files), last
    for result in (last, encode):
        assert result["image_errors"] == 1, result
        (example,) = result["image_error_examples"]
        assert example["task"] == broken and example["object"] == "image", example
        assert "gone.jpg" in example["error"] and "re-upload" in example["error"], example

    # One prediction of the new version per good task, none for the broken one.
    current = {}
    for task in client.tasks.list(project=project.id, fields="all", page_size=100):
        task = task.model_dump(mode="json")
        mine = [p for p in task["predictions"] if p["model_version"] == version]
        assert len(mine) == (0 if task["id"] == broken else 1), (task["id"], task["predictions"])
        if mine:
            current[task["id"]] = mine[0]
            # Both controls answered: the single choice once, the multi-label one at least once.
            chosen = {r["from_name"]: r["value"]["choices"] for r in mine[0]["result"]}
            assert set(chosen) == {"kind", "look"} and len(chosen["kind"]) == 1 and chosen["look"], chosen
    assert set(current) == set(tasks) - {broken}
    # The head learned the sample images: a mirrored or cropped copy gets its original's kind.
    unlabeled = sorted(set(current) - set(labeled))
    hits = sum(current[i]["result"][0]["value"]["choices"] == [truth(i)[0]] for i in unlabeled)
    assert hits >= 0.75 * len(unlabeled), (hits, len(unlabeled))
    assert set(last["controls"]) == {"kind", "look"} and last["controls"]["look"]["multi_label"], last
    # The queue: the model's order, not the task ids', among the tasks nobody labeled.
    by_score = sorted(unlabeled, key=lambda i: (current[i]["score"], i))
    assert by_score != unlabeled, "the queue is in task id order"
    assert max(current[i]["score"] for i in unlabeled) < min(current[i]["score"] for i in labeled)

    # /predict answers image tasks too, one entry per task: the broken one gets an empty list.
    asked = [tasks[i] for i in unlabeled] + [tasks[broken]]
    answer = requests.post(f"{services.url}/predict", timeout=120,
                           json={"tasks": asked, "project": f"{project.id}.0", "label_config": CONFIG}).json()
    *good, bad = answer["results"]
    assert all(g["model_version"] == version and g["result"][0]["value"]["choices"] for g in good), good
    assert bad == []
    # The same network and heads as the retrain's: every answer is the uploaded prediction's.
    def choices(prediction):
        return {r["from_name"]: sorted(r["value"]["choices"]) for r in prediction["result"]}

    assert [choices(g) for g in good] == [choices(current[i]) for i in unlabeled]

    meta = json.loads((services.data_dir / "models" / str(project.id) / version / "meta.json").read_text())
    tuned_network = services.data_dir / "models" / str(project.id) / version / "image_encoder"
    assert meta["fine_tune_layers"] == fine_tune_layers
    if fine_tune_layers:
        # Its own network (safetensors), its own cache id, and the stages it went through.
        assert (tuned_network / "network.safetensors").is_file() and "+ft-" in meta["image_encoder"], meta
        assert {"fine_tune_images", "encode_fine_tuned_images"} <= set(last["timings"]), last
    else:
        assert not tuned_network.exists() and "+ft-" not in meta["image_encoder"]
    # The project page lists the queue's next tasks by their image.
    page = requests.get(f"{services.url}/projects/{project.id}", timeout=30)
    assert page.status_code == 200 and tasks[by_score[0]]["data"]["image"] in page.text
    client.projects.delete(id=project.id)
