"""Versioned model store on disk, shared by the web app and the workers.

Layout, per project::

    <DATA_DIR>/models/<project_id>/
        v0003-20261121-231502/      one directory per model version, complete or absent
            heads.safetensors       every control's head (model.heads.ControlHeads)
            heads.json              (versions before several controls: classifier.*)
            meta.json               label config, encoder id, labels used, metrics
        CURRENT                     the name of the version /predict serves

A version is written into a hidden staging directory and renamed into place in one step,
and CURRENT is replaced atomically, so a reader sees either the old model or the new one,
never half of one. A job publishes CURRENT only after Label Studio accepted the version's
predictions, so a failed upload leaves the project on its previous model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from backend.label_config import LabelConfig
from model.heads import ControlHeads

META_FILE = "meta.json"
ENCODER_DIR = "encoder"  # a fine-tuned encoder, when FINE_TUNE_LAYERS > 0
IMAGE_ENCODER_DIR = "image_encoder"  # a fine-tuned image network (safetensors), likewise
CENTROIDS_FILE = "clusters.npz"  # the project's k-means centroids, reused across versions
VERSION_RE = re.compile(r"^v(\d{4,})-\d{8}-\d{6}$")


@dataclass
class LoadedModel:
    project_id: int
    version: str
    heads: ControlHeads  # one head per learnable control of the version's label config
    meta: dict

    directory: Path

    @property
    def head(self):
        """The first control's head (the single-control view)."""
        return self.heads.heads[0]

    @property
    def label_config(self) -> LabelConfig:
        return LabelConfig.from_dict(self.meta["label_config"])

    @property
    def encoder_dir(self) -> Path | None:
        """The fine-tuned encoder of this version, or None when it uses the base encoder."""
        path = self.directory / ENCODER_DIR
        return path if path.is_dir() else None

    @property
    def image_encoder_dir(self) -> Path | None:
        """The fine-tuned image network of this version, or None when it uses the base one."""
        path = self.directory / IMAGE_ENCODER_DIR
        return path if path.is_dir() else None


def version_number(version: str) -> int:
    match = VERSION_RE.match(version or "")
    return int(match.group(1)) if match else -1


class ModelStore:
    def __init__(self, root: str | Path, keep: int = 5, cache_size: int = 16):
        self.root = Path(root)
        self.keep = keep
        self._cache: OrderedDict[tuple[int, str], LoadedModel] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def project_dir(self, project_id: int) -> Path:
        return self.root / str(int(project_id))

    def versions(self, project_id: int) -> list[str]:
        """Complete versions of a project, oldest first."""
        directory = self.project_dir(project_id)
        if not directory.is_dir():
            return []
        found = [p.name for p in directory.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
        return sorted(found, key=version_number)

    def current_version(self, project_id: int) -> str | None:
        try:
            version = (self.project_dir(project_id) / "CURRENT").read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return version or None

    def projects(self) -> list[int]:
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if p.name.isdigit())

    def stage(self, project_id: int, heads: ControlHeads, meta: dict,
              encoder_dir: Path | None = None, image_encoder_dir: Path | None = None) -> str:
        """Write a complete new version (not yet served) and return its name.

        `heads`: all heads of the version, saved together (`ControlHeads.save`; a lone
        `ClassifierHead` is saved in the single-head format, which `load` reads too).
        `encoder_dir`, a fine-tuned encoder saved under the project directory, is moved in;
        so is `image_encoder_dir`, a fine-tuned image network.
        """
        directory = self.project_dir(project_id)
        directory.mkdir(parents=True, exist_ok=True)
        existing = [version_number(v) for v in self.versions(project_id)]
        number = max(existing, default=0) + 1
        version = f"v{number:04d}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
        try:
            heads.save(staging)
            if encoder_dir is not None:
                os.rename(encoder_dir, staging / ENCODER_DIR)
            if image_encoder_dir is not None:
                os.rename(image_encoder_dir, staging / IMAGE_ENCODER_DIR)
            meta = dict(meta, model_version=version, project_id=int(project_id),
                        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (staging / META_FILE).write_text(json.dumps(meta, indent=2))
            _fsync_dir(staging)
            os.rename(staging, directory / version)
            _fsync_dir(directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def read_centroids(self, project_id: int, encoder_id: str):
        """The project's k-means centroids from its last scoring under this encoder, or None."""
        import numpy as np

        path = self.project_dir(project_id) / CENTROIDS_FILE
        try:
            with np.load(path, allow_pickle=False) as saved:
                if str(saved["encoder"]) != encoder_id:
                    return None
                return saved["centroids"]
        except (FileNotFoundError, KeyError, ValueError, OSError):
            return None

    def write_centroids(self, project_id: int, encoder_id: str, centroids) -> None:
        import numpy as np

        directory = self.project_dir(project_id)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{CENTROIDS_FILE}.{os.getpid()}.{threading.get_ident()}.npz"
        np.savez(tmp, encoder=np.array(encoder_id), centroids=np.asarray(centroids, dtype=np.float32))
        os.replace(tmp, directory / CENTROIDS_FILE)

    def activate(self, project_id: int, version: str) -> None:
        """Make `version` the one /predict serves; prune old versions."""
        directory = self.project_dir(project_id)
        if not (directory / version / META_FILE).is_file():
            raise FileNotFoundError(f"model version {version} of project {project_id} does not exist")
        tmp = directory / f".CURRENT.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(version + "\n")
        os.replace(tmp, directory / "CURRENT")
        _fsync_dir(directory)
        self._prune(project_id, version)

    def _prune(self, project_id: int, current: str) -> None:
        versions = self.versions(project_id)
        for old in versions[: max(0, len(versions) - self.keep)]:
            if old != current:
                shutil.rmtree(self.project_dir(project_id) / old, ignore_errors=True)
        leftovers = list(self.project_dir(project_id).glob(".staging-*"))
        leftovers += self.project_dir(project_id).glob(".finetune-*")
        for leftover in leftovers:
            # A staging directory older than an hour belongs to a job that died.
            if time.time() - leftover.stat().st_mtime > 3600:
                shutil.rmtree(leftover, ignore_errors=True)

    def switched_at(self, project_id: int) -> float | None:
        """When the project's live version was last switched (the CURRENT pointer's time)."""
        try:
            return (self.project_dir(project_id) / "CURRENT").stat().st_mtime
        except (FileNotFoundError, NotADirectoryError):
            return None

    def read_meta(self, project_id: int, version: str) -> dict:
        return json.loads((self.project_dir(project_id) / version / META_FILE).read_text())

    def load(self, project_id: int, version: str | None = None) -> LoadedModel | None:
        """The given (default: current) version, from an in-process cache after first load."""
        version = version or self.current_version(project_id)
        if version is None:
            return None
        key = (int(project_id), version)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        directory = self.project_dir(project_id) / version
        try:
            meta = json.loads((directory / META_FILE).read_text())
            # A single-head version does not record its control's name: its config does.
            single_name = (meta.get("label_config") or {}).get("from_name") or "label"
            loaded = LoadedModel(
                project_id=int(project_id),
                version=version,
                heads=ControlHeads.load(directory, single_name=single_name),
                meta=meta,
                directory=directory,
            )
        except FileNotFoundError:
            return None
        with self._lock:
            self._cache[key] = loaded
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return loaded


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
