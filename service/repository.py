"""The model repository: versions on disk, loaded under a policy, swapped without downtime.

Layout (Triton's, so `make export-triton` output and this repository can be one folder):

    <repository>/<model>/<version>/model.onnx     a self-describing ONNX (int8 / fp32 / fp16):
                                                 its metadata_props are the configuration
                                   /model.plan    TensorRT engine (+ model.plan.json sidecar)
                                   /explain.onnx  the fp32 explain artifact (optional)
    <repository>/<model>/policy.json             optional: {"version_policy": "latest:2",
                                                 "default_version": "3"}
    <repository>/<model>/labels.txt              optional: every version must have these labels

Every loaded version has its own Classifier (backend + batcher + metrics labelled by model and
version). Requests resolve a version when they start and hold a lease on it until they end; a
swap loads and warms the new version off the request path (a thread; the running batchers keep
going), then replaces the model's serving set in one assignment; versions that left it drain
(their leases end, their queues empty) and unload in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from contract.files import sha256_file
from contract.gpu import GPU_PROVIDERS
from contract.metadata import read_onnx_metadata
from service.artifacts import ModelNotFound, resolve_model_path
from service.backends import Backend, warmup
from service.classifier import Classifier
from service.errors import NotReady, ServiceError
from service.explain import Explainer, explain_path
from service.metrics import Metrics
from service.schemas import ModelCard, ModelList, ModelRef, VersionStatus
from service.settings import VERSION_POLICY_PATTERN, Settings

log = logging.getLogger(__name__)

BackendLoader = Callable[[Settings, Path], Backend]
STATES = ("loading", "ready", "unloading", "failed")
_POLICY = re.compile(VERSION_POLICY_PATTERN)


class ModelNotLoaded(ServiceError):
    status, code = 404, "model_not_found"


class LoadFailed(ServiceError):
    """A load the control API asked for failed; what was serving still serves."""

    status, code = 400, "load_failed"


class TooManyVersions(ServiceError):
    status, code = 409, "too_many_versions"


# --- what is on disk -------------------------------------------------------------------------


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to keep loaded (Triton's version_policy)."""

    kind: str  # latest | all | specific
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        text = text.strip()
        if not _POLICY.match(text):
            raise ValueError(f"version policy {text!r}: use latest:N, all or specific:1,3")
        kind, _, arg = text.partition(":")
        if kind == "latest":
            return cls("latest", count=int(arg))
        if kind == "specific":
            return cls("specific", versions=tuple(sorted({int(v) for v in arg.split(",")})))
        return cls("all")

    @classmethod
    def from_triton(cls, config: dict) -> VersionPolicy | None:
        """The `version_policy` of a Triton ModelConfig in JSON form, e.g. the `config` that
        tritonclient's load_model(name, config=...) sends: {"specific": {"versions": [1]}}."""
        vp = config.get("version_policy")
        if vp is None:
            return None
        if isinstance(vp, str):
            return cls.parse(vp)
        if "latest" in vp:
            return cls("latest", count=int(vp["latest"].get("num_versions", 1)))
        if "specific" in vp:
            return cls(
                "specific", versions=tuple(sorted(int(v) for v in vp["specific"]["versions"]))
            )
        if "all" in vp:
            return cls("all")
        raise ValueError(f"unknown version_policy {vp!r}")

    def select(self, available: list[int]) -> list[int]:
        if self.kind == "latest":
            return sorted(available)[-self.count :]
        if self.kind == "specific":
            return [v for v in self.versions if v in available]
        return sorted(available)

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"


@dataclass(frozen=True)
class VersionSource:
    name: str
    version: int
    artifact: Path
    explain: Path | None  # None: no explain artifact for this version


def version_artifact(folder: Path, settings: Settings) -> Path | None:
    """The artifact a version folder serves: model.plan for TensorRT; else model.onnx; else the
    one *.onnx the precision preference picks (fp16 on GPU providers, else int8, then fp32)."""
    if settings.backend == "tensorrt":
        plan = folder / "model.plan"
        return plan if plan.is_file() else None
    if (folder / "model.onnx").is_file():
        return folder / "model.onnx"
    graphs = [p for p in sorted(folder.glob("*.onnx")) if "explain" not in p.name]
    first = "fp16" if GPU_PROVIDERS & set(settings.providers) else "int8"
    for variant in (first, "fp32"):
        for p in graphs:
            if f".{variant}." in p.name:
                return p
    return graphs[0] if graphs else None


def version_explain(folder: Path) -> Path | None:
    for p in [folder / "explain.onnx", *sorted(folder.glob("*.explain.onnx"))]:
        if p.is_file():
            return p
    return None


class RepositorySource:
    """Reads `<repository>/<model>/<version>/` folders. Hidden folders (a publisher's `.tmp-*`
    before its atomic rename) and non-numeric ones are not versions."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root, self.settings = root, settings

    def check(self) -> None:
        """ModelNotFound (a one-line start error) when there is nothing to serve."""
        if not self.root.is_dir():
            raise ModelNotFound(f"no model repository at {self.root} (ESC50_MODEL_REPOSITORY)")
        if not self.models():
            raise ModelNotFound(f"the model repository {self.root} holds no model folder")

    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _is_name(p.name))

    def versions(self, name: str) -> dict[int, VersionSource]:
        found: dict[int, VersionSource] = {}
        model_dir = self.root / name
        if not _is_name(name) or not model_dir.is_dir():
            return found
        for folder in model_dir.iterdir():
            if folder.is_dir() and folder.name.isdigit() and int(folder.name) > 0:
                artifact = version_artifact(folder, self.settings)
                if artifact is not None:
                    v = int(folder.name)
                    explain = version_explain(folder) or self._explain_fallback(name)
                    found[v] = VersionSource(name, v, artifact, explain)
        return found

    def _explain_fallback(self, name: str) -> Path | None:
        """A version folder without explain.onnx: ESC50_EXPLAIN_MODEL_PATH, or `make export`'s
        <stem>.explain.onnx for the model named ESC50_MODEL_STEM (the explainer refuses an
        artifact of another checkpoint, with the reason)."""
        if self.settings.explain_model_path is not None or name == self.settings.model_stem:
            return explain_path(self.settings)
        return None

    def policy_file(self, name: str) -> dict:
        path = self.root / name / "policy.json"
        if not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text())
            return doc if isinstance(doc, dict) else {}
        except ValueError as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return {}

    def labels(self, name: str) -> list[str] | None:
        path = self.root / name / "labels.txt"
        if not path.is_file():
            return None
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class SingleModelSource(RepositorySource):
    """ESC50_MODEL_PATH, or the legacy ESC50_MODEL_DIR/STEM artifacts: one model, version 1."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(Path("/nonexistent"), settings)
        self.artifact = resolve_model_path(settings)  # ModelNotFound: the one-line start error
        self.name = _artifact_name(self.artifact, settings)

    def check(self) -> None:
        pass  # resolve_model_path above has checked

    def models(self) -> list[str]:
        return [self.name]

    def versions(self, name: str) -> dict[int, VersionSource]:
        if name != self.name:
            return {}
        explain = explain_path(self.settings)
        return {1: VersionSource(name, 1, self.artifact, explain)}


def _is_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name))


def _artifact_name(path: Path, settings: Settings) -> str:
    """The name an artifact calls its model (its metadata), else the file's stem."""
    if path.suffix == ".onnx":
        with contextlib.suppress(Exception):  # a broken file fails its load, with the reason
            return read_onnx_metadata(path).model_name
    return settings.model_stem


def open_source(settings: Settings) -> RepositorySource:
    legacy = {"model_dir", "model_stem"} & settings.model_fields_set
    if settings.model_path is not None or settings.model_repository is None:
        return SingleModelSource(settings)
    if legacy and "model_repository" not in settings.model_fields_set:
        return SingleModelSource(settings)
    return RepositorySource(settings.model_repository, settings)


# --- a loaded version ------------------------------------------------------------------------


class ModelVersion:
    def __init__(self, source: VersionSource) -> None:
        self.source = source
        self.name, self.version = source.name, str(source.version)
        self.state, self.reason = "loading", ""
        self.classifier: Classifier | None = None
        self.explainer: Explainer | None = None
        self.memory_bytes: int | None = None
        self.users = 0  # requests holding a lease (event loop only)
        self.error: Exception | None = None  # why it failed to load, as raised

    def status(self) -> VersionStatus:
        return VersionStatus(
            name=self.name, version=self.version, state=self.state, reason=self.reason
        )


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _return_memory() -> None:
    """Collect and give freed heap back to the OS, so an unloaded version's memory shows as
    returned (glibc keeps freed arenas otherwise)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --- the repository --------------------------------------------------------------------------


class ModelRepository:
    def __init__(self, settings: Settings, metrics: Metrics, backend_loader: BackendLoader) -> None:
        self.settings, self.metrics, self.backend_loader = settings, metrics, backend_loader
        self.source = open_source(settings)
        self.global_policy = VersionPolicy.parse(settings.version_policy)
        # chosen once: every request and probe asks for it, and the folder listing is disk I/O
        self.default_model = settings.default_model or _default_model_of(self.source.models())
        # what answers: model -> {version: ModelVersion}, replaced whole on a swap (atomic
        # for the event loop); and each model's default version
        self.serving: dict[str, dict[str, ModelVersion]] = {}
        self.default_version: dict[str, str] = {}
        self.other: dict[tuple[str, str], ModelVersion] = {}  # loading, unloading, failed
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._starting = True  # until the start-up versions are warm
        self._unloaded: set[str] = set()  # unloaded by the control API: the poller leaves them

    # --- resolving a request's version ----------------------------------------------------

    def get(self, name: str | None = None, version: str | None = None) -> ModelVersion:
        """The ready version a request goes to; 404 if unknown, 503 if not (yet) loaded."""
        name = name or self.default_model
        if name is None:
            raise ModelNotLoaded("the model repository is empty")
        versions = self.serving.get(name, {})
        wanted = version or self.default_version.get(name)
        if wanted is not None and wanted in versions:
            return versions[wanted]
        retry = {"Retry-After": str(self.settings.retry_after_s)}
        pending = self.other.get((name, wanted or ""))
        if pending is not None:
            why = f": {pending.reason}" if pending.reason else ""
            raise NotReady(f"model {name} version {wanted} is {pending.state}{why}", retry)
        if version is None and self.known(name):
            raise NotReady(f"model {name} has no version loaded", retry)
        if version is not None and self.known(name):
            raise ModelNotLoaded(f"model {name} has no version {version} loaded")
        raise ModelNotLoaded(f"no model {name!r} in the repository")

    def known(self, name: str) -> bool:
        return name in self.serving or name in self.source.models()

    @contextlib.contextmanager
    def lease(self, name: str | None = None, version: str | None = None) -> Iterator[ModelVersion]:
        """The version for one request, kept loaded until the request ends."""
        mv = self.get(name, version)
        mv.users += 1
        try:
            yield mv
        finally:
            mv.users -= 1

    @property
    def starting(self) -> bool:
        return self._starting

    def is_ready(self) -> bool:
        """Readiness: the start-up models are warm (or failed, with a reason) and the default
        model answers."""
        name = self.default_model
        return not self._starting and name is not None and bool(self.serving.get(name))

    # --- listing ---------------------------------------------------------------------------

    def versions(self) -> list[ModelVersion]:
        every = [mv for vs in self.serving.values() for mv in vs.values()]
        return sorted([*every, *self.other.values()], key=_order)

    def model_list(self) -> ModelList:
        cards: list[ModelCard] = []
        for name in sorted(self.serving):
            for v, mv in sorted(self.serving[name].items(), key=lambda kv: int(kv[0])):
                assert mv.classifier is not None
                default = self.default_version.get(name) == v
                cards.append(mv.classifier.card("ready", default, mv.memory_bytes))
        others = [mv.status() for mv in sorted(self.other.values(), key=_order)]
        return ModelList(default_model=self.default_model, models=cards, unavailable=others)

    def index(self) -> list[dict[str, str]]:
        """Triton's repository index: every model on disk and loaded, with version and state."""
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for name in self.source.models():
            rows[(name, "")] = {
                "name": name,
                "version": "",
                "state": "UNAVAILABLE",
                "reason": "unloaded",
            }
        for mv in self.versions():
            rows.pop((mv.name, ""), None)
            state = {"failed": "UNAVAILABLE"}.get(mv.state, mv.state.upper())
            rows[(mv.name, mv.version)] = {
                "name": mv.name,
                "version": mv.version,
                "state": state,
                "reason": mv.reason,
            }
        return [rows[k] for k in sorted(rows, key=lambda k: (k[0], int(k[1] or 0)))]

    # --- loading ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the start-up models' backends (a broken default model stops the start, as
        before the repository); warm them and put them in service in the background."""
        names = self.source.models()
        if self.settings.startup_models != ["*"]:
            names = [n for n in self.settings.startup_models if n in names]
        opened: list[ModelVersion] = []
        for name in names:
            policy = self._policy(name)
            available = self.source.versions(name)
            for v in policy.select(sorted(available)):
                mv = await self._open(available[v])
                if mv.error is not None and name == self.default_model:
                    raise mv.error  # the loader's own error: the start fails with its words
                opened.append(mv)
        self._spawn(self._warm_and_serve(opened))

    async def _warm_and_serve(self, opened: list[ModelVersion]) -> None:
        try:
            for mv in opened:
                if mv.state == "failed":
                    continue
                await self._warm(mv, thorough=True)
                if mv.state == "ready":
                    self._swap(mv.name, {**self.serving.get(mv.name, {}), mv.version: mv}, [])
        finally:
            self._starting = False

    async def load(self, name: str, policy: VersionPolicy | None = None) -> list[ModelVersion]:
        """Bring `name` to what its policy wants: new versions load and warm first, then the
        serving set switches in one step; versions that left it drain and unload. A failed
        version leaves what serves untouched and raises LoadFailed with the reason."""
        if not _is_name(name) or name not in self.source.models():
            raise ModelNotLoaded(f"no model {name!r} in the repository")
        async with self._lock(name):
            self._unloaded.discard(name)
            available = self.source.versions(name)
            if not available:
                raise LoadFailed(f"failed to load '{name}': no version folder with a model")
            policy = policy or self._policy(name)
            wanted = [str(v) for v in policy.select(sorted(available))]
            if not wanted:
                raise LoadFailed(f"failed to load '{name}': policy {policy} selects no version")
            current = self.serving.get(name, {})
            new = [v for v in wanted if v not in current]
            staying = len(self._loaded()) - len([v for v in current if v not in wanted])
            if staying + len(new) > self.settings.max_loaded_versions:
                raise TooManyVersions(
                    f"loading {name} {', '.join(new)} would hold more than "
                    f"ESC50_MAX_LOADED_VERSIONS={self.settings.max_loaded_versions} versions"
                )
            loaded: list[ModelVersion] = []
            failed: list[ModelVersion] = []
            for v in new:
                mv = await self._open(available[int(v)])
                if mv.state != "failed":
                    await self._warm(mv)
                (loaded if mv.state == "ready" else failed).append(mv)
            serving = {v: mv for v, mv in current.items() if v in wanted}
            serving |= {mv.version: mv for mv in loaded}
            if failed and not loaded:
                serving = current  # nothing new to serve: keep everything as it was
            retired = [mv for v, mv in current.items() if v not in serving]
            self._swap(name, serving, retired, self._default_of(name, serving))
            if failed:
                why = "; ".join(f"version {mv.version}: {mv.reason}" for mv in failed)
                raise LoadFailed(f"failed to load '{name}': {why}")
            return list(serving.values())

    async def unload(self, name: str) -> None:
        """Take every version of `name` out of service; each drains and unloads."""
        async with self._lock(name):
            self._unloaded.add(name)
            current = self.serving.get(name)
            if current is None and not any(k[0] == name for k in self.other):
                if name in self.source.models():
                    return  # not loaded: nothing to do (Triton answers 200)
                raise ModelNotLoaded(f"no model {name!r} loaded")
            for key in [k for k, mv in self.other.items() if k[0] == name and mv.state == "failed"]:
                self._forget(self.other.pop(key))
            self._swap(name, {}, list((current or {}).values()))

    async def poll(self) -> None:
        """Every ESC50_REPOSITORY_POLL_S: load new version folders of the loaded models and,
        when every model loads at start-up ("*"), new models; not one the control API unloaded."""
        seen = {n: set(self.source.versions(n)) for n in self.source.models()}
        while not self._closing:
            await asyncio.sleep(self.settings.repository_poll_s)
            names = set(self.serving)
            if self.settings.startup_models == ["*"]:
                names |= set(await asyncio.to_thread(self.source.models))
            for name in sorted(names - self._unloaded):
                now = set(await asyncio.to_thread(self.source.versions, name))
                if now and now != seen.get(name):
                    seen[name] = now
                    with contextlib.suppress(ServiceError):  # logged; the old keeps serving
                        await self.load(name)

    async def close(self) -> None:
        """Drain and unload everything (shutdown)."""
        self._closing = True
        for name in list(self.serving):
            self._swap(name, {}, list(self.serving[name].values()))
        for mv in list(self.other.values()):
            if mv.state == "failed":
                self._forget(self.other.pop((mv.name, mv.version)))
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # --- internals --------------------------------------------------------------------------

    def _policy(self, name: str) -> VersionPolicy:
        text = self.source.policy_file(name).get("version_policy")
        try:
            return VersionPolicy.parse(text) if isinstance(text, str) else self.global_policy
        except ValueError as e:
            log.warning("%s/policy.json: %s; using %s", name, e, self.global_policy)
            return self.global_policy

    def _default_of(self, name: str, serving: dict[str, ModelVersion]) -> str | None:
        if not serving:
            return None
        chosen = str(self.source.policy_file(name).get("default_version", ""))
        return chosen if chosen in serving else max(serving, key=int)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _loaded(self) -> list[ModelVersion]:
        every = [mv for vs in self.serving.values() for mv in vs.values()]
        return every + [mv for mv in self.other.values() if mv.state == "loading"]

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, mv: ModelVersion, state: str, reason: str = "") -> None:
        for s in STATES:
            self.metrics.version_state.labels(mv.name, mv.version, s).set(int(s == state))
        mv.state, mv.reason = state, reason

    async def _open(self, src: VersionSource) -> ModelVersion:
        """Load the backend (a thread) and start the version's batcher; state loading or
        failed (with the reason). Never raises for a bad artifact."""
        mv = ModelVersion(src)
        self.other[(mv.name, mv.version)] = mv
        self._set_state(mv, "loading")
        before = resident_bytes()
        try:
            backend = await asyncio.to_thread(self.backend_loader, self.settings, src.artifact)
        except Exception as e:  # corrupt file, wrong contract, missing runtime: say why
            log.error("cannot load %s version %s (%s): %s", mv.name, mv.version, src.artifact, e)
            self._set_state(mv, "failed", f"{src.artifact.name}: {e}")
            mv.error = e
            return mv
        try:
            self._check_labels(mv, backend)
            sha = await asyncio.to_thread(sha256_file, src.artifact)
        except ServiceError as e:
            backend.close()
            self._set_state(mv, "failed", e.message)
            mv.error = e
            return mv
        ref = ModelRef(
            name=mv.name, version=mv.version, variant=backend.metadata.variant, sha256=sha[:12]
        )
        vm = self.metrics.for_version(mv.name, mv.version)
        mv.classifier = Classifier(backend, self.settings, vm, ref)
        mv.classifier.start()
        mv.explainer = Explainer(self.settings, src.explain) if src.explain else None
        mv.memory_bytes = max(0, resident_bytes() - before)
        return mv

    def _check_labels(self, mv: ModelVersion, backend: Backend) -> None:
        expected = self.source.labels(mv.name)
        if expected is not None and expected != backend.metadata.labels:
            raise LoadFailed(
                f"its labels disagree with {mv.name}/labels.txt "
                f"({len(backend.metadata.labels)} vs {len(expected)} labels)"
            )

    async def _warm(self, mv: ModelVersion, thorough: bool = False) -> None:
        """Run the batch shapes in a thread: never on the request path, never stalling the
        other versions' batchers. A version that fails its warm-up is unloaded and failed."""
        assert mv.classifier is not None
        before = resident_bytes() - (mv.memory_bytes or 0)
        if self.settings.warmup:
            t0 = time.perf_counter()
            largest = mv.classifier.max_batch_size
            sizes = [1, largest]
            if thorough:
                # At start-up, when nothing is served yet: every batch size, ascending, then
                # small and large in turn (1, 16, 2, 15, ...). ONNX Runtime's CPU arena grows
                # when a large batch follows smaller ones that split its free blocks, and keeps
                # what it grew; driven to its plateau here, it does not grow later at a moment
                # traffic decides (a 2-minute soak saw a ~90 MiB step mid-run; after this, 300
                # random batch sizes added 14 MiB on the shipped int8 model). Not for a swap:
                # under traffic its seconds of CPU made the serving version refuse requests.
                ascending = list(range(1, largest + 1))
                pairs = zip(ascending, reversed(ascending), strict=True)
                sizes = ascending + [n for pair in pairs for n in pair]
            try:
                await asyncio.to_thread(warmup, mv.classifier.backend, sizes)
            except Exception as e:
                log.exception("warm-up of %s %s failed", mv.name, mv.version)
                await asyncio.to_thread(self._close_version, mv)
                self._set_state(mv, "failed", f"warm-up failed: {e}")
                return
            log.info(
                "warmed %s %s on %d batches (sizes 1-%d) in %.2f s",
                *(mv.name, mv.version, len(sizes), largest, time.perf_counter() - t0),
            )
        mv.memory_bytes = max(0, resident_bytes() - before)
        self.metrics.version_memory.labels(mv.name, mv.version).set(mv.memory_bytes)
        self._set_state(mv, "ready")

    def _swap(
        self,
        name: str,
        serving: dict[str, ModelVersion],
        retired: list[ModelVersion],
        default: str | None = None,
    ) -> None:
        """Switch `name`'s serving set in one step (event loop: no request sees half of it)."""
        for mv in serving.values():
            self.other.pop((mv.name, mv.version), None)
        if serving:
            self.serving[name] = serving
            self.default_version[name] = default or self._default_of(name, serving) or ""
        else:
            self.serving.pop(name, None)
            self.default_version.pop(name, None)
        for mv in retired:
            self.other[(mv.name, mv.version)] = mv
            self._set_state(mv, "unloading")
            self._spawn(self._retire(mv))
        if serving:
            d = self.default_version[name]
            log.info("%s serves versions %s (default %s)", name, sorted(serving, key=int), d)
            if name == self.default_model:
                self._publish_default(serving[d])

    def _publish_default(self, mv: ModelVersion) -> None:
        c = mv.classifier
        assert c is not None
        self.metrics.model_info.info(
            {
                "name": mv.name,
                "version": mv.version,
                "variant": c.meta.variant,
                "sha256": c.ref.sha256,
                "backend": c.backend.name,
                "provider": c.backend.provider,
                "path": mv.source.artifact.name,
            }
        )

    async def _retire(self, mv: ModelVersion) -> None:
        """Wait for the version's leases to end (up to the drain timeout), drain its queue,
        close it and give its memory back."""
        give_up = time.monotonic() + self.settings.drain_timeout_s
        while mv.users > 0 and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        if mv.users:
            log.warning("%s %s: %d requests still running at unload", mv.name, mv.version, mv.users)
        await asyncio.to_thread(self._close_version, mv)
        self._forget(self.other.pop((mv.name, mv.version), mv))
        log.info("unloaded %s %s", mv.name, mv.version)

    def _close_version(self, mv: ModelVersion) -> None:
        if mv.classifier is not None:
            mv.classifier.stop()  # drains what is queued: accepted requests get answers
            mv.classifier.backend.close()
            mv.classifier = None
        if mv.explainer is not None:
            mv.explainer.close()
            mv.explainer = None
        _return_memory()

    def _forget(self, mv: ModelVersion) -> None:
        for s in STATES:
            with contextlib.suppress(KeyError):
                self.metrics.version_state.remove(mv.name, mv.version, s)
        self.metrics.forget_version(mv.name, mv.version)


def _default_model_of(names: list[str]) -> str | None:
    """The shipped model when the repository has it, else the first model."""
    if "esc50-resnet34" in names:
        return "esc50-resnet34"
    return names[0] if names else None


def _order(mv: ModelVersion) -> tuple[str, int]:
    return (mv.name, int(mv.version))


__all__ = ["ModelNotFound", "ModelRepository", "ModelVersion", "VersionPolicy"]
