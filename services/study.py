"""Study orchestration on Ray: solver actors -> one buffer shard per trainer rank -> Ray Train, from one thread.

A ``Study`` owns the lifecycle: it acquires the study's resources (control actor, ingest server,
solver actors, the Ray Train run, buffer shards), registering each one's teardown as it goes,
and reports a ``StudySnapshot`` (``services.snapshot``). Simulations are handed out by the
``Dispatcher`` (``services.dispatch``) from the study's ledger (``services.ledger``), which
journals every hand-out and outcome in the study's directory so that ``resumable`` can go on
with a study whose driver died. With an ``ingest`` section, external solvers feed the same
buffer over gRPC (``services.ingest``), taking their simulations from the same ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray

from services import auth
from services.actors import BufferShard, SolverActor, StudyControl
from services.config import StudyConfig
from services.dataplane import ShardCounts, ShardRouter, merge_stats
from services.dispatch import Dispatcher
from services.fallback import Fallbacks, FallbackUnavailable
from services.ledger import LedgerError, SimulationIds
from services.metrics import PROGRESS_DIR
from services.queries import QuerySampler, query_source
from services.sampling import make_sampler
from services.snapshot import (
    BufferFigures,
    Nodes,
    SampleCounts,
    SamplerFigures,
    SimulationCounts,
    StudySnapshot,
    StudyState,
    TrainingFigures,
)
from services.training import WorkerInputs, train_worker, validation_fingerprint, validation_set
from trainer.dataset import Dataset
from trainer.ensemble import point_scores
from trainer.problem import ProblemSpec
from trainer.store import ModelStore, StoreError

log = logging.getLogger("surge.study")

_RANKS_WAIT_S = 600.0  # the trainer workers must all have started by then


class Study:
    """One running study. Thread-safe ``snapshot()`` for the gateway, CLI and metrics."""

    def __init__(
        self,
        config: StudyConfig,
        store_root: str | Path,
        study_id: str | None = None,
        ingest_token: str | None = None,
        resume: bool = False,
    ) -> None:
        self.config = config
        self.id = study_id or f"{config.name}-{uuid.uuid4().hex[:8]}"
        self.store_root = str(Path(store_root).resolve())
        self.spec: ProblemSpec = config.problem.spec()
        self.state = StudyState.CREATED
        self.error: str | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._stop = threading.Event()
        self._stop_at = 0.0  # when stop() was first called (monotonic): the grace period runs from there
        self._lock = threading.Lock()
        self._buffer_stats: dict[str, Any] = {}
        self._nodes: set[str] = set()
        self.progress_path = Path(self.store_root) / PROGRESS_DIR / f"{self.id}.json"
        # Set by a manager that serves studies for a long time (the gateway): a finished study then
        # gives back its actors at once; left unset, they stay for their counts to be read (tests).
        self.release_when_done = False
        self._rates: dict[str, float] = {"produced_per_s": 0.0, "consumed_per_s": 0.0}
        self._thread: threading.Thread | None = None
        self.control: ray.actor.ActorHandle | None = None
        self.shards: list[ray.actor.ActorHandle] = []
        self._shard_counts = ShardCounts()
        self._buffer_state = "open"  # then "closed" or "aborted": re-applied to a shard that restarts
        self.rank_states: dict[int, dict[str, Any]] = {}
        self.record_keys = False  # ranks report the keys they trained on (tests)
        self.use_gpu = False
        self.dir = study_dir(self.store_root, self.id)
        self.resumed = resume
        sc = config.sampler
        sampler = make_sampler(
            self.spec.params,
            sc.kind,
            sc.seed,
            sc.breed_settings() if sc.breeds else None,
            sc.uncertainty_settings().model_dump() if sc.kind == "uncertainty" else None,
            sc.queries_settings().model_dump() if sc.kind == "queries" else None,
            # Where the gateway keeps the points users ask the served model about (services.queries).
            query_source(self.store_root, config.served_name, self.spec.params) if sc.kind == "queries" else None,
        )
        self.sampler = sampler
        self.losses_observed = 0  # per-simulation losses passed to an adaptive sampler
        self.scorer_version: int | None = None  # the model version scoring an uncertainty sampler's draws
        self._scorer_checked = -math.inf
        ledger_args = (sampler, config.sampler.seed, config.simulations, config.solvers.max_attempts)
        self._lockfile: Any = None
        if resume:
            # Only once no other process drives the study may its journal be read and written on.
            self._lock_driver()
            # Where the dead driver stood: the same sampler position, attempts, done and given-up ids.
            try:
                self.ids = SimulationIds.replay(self.dir / LEDGER_FILE, *ledger_args)
            except BaseException:
                self._unlock_driver()
                raise
        else:
            if (self.dir / LEDGER_FILE).exists():
                raise StudyExists(f"study {self.id!r} exists in {self.store_root}: resume it, or start a new one")
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / CONFIG_FILE).write_text(config.model_dump_json(indent=1))
            self._lock_driver()
            self.ids = SimulationIds(*ledger_args, journal=self.dir / LEDGER_FILE)
        abort = lambda: self._shards_call("abort")  # noqa: E731
        self.dispatch = Dispatcher(self.id, config, self.ids, self._stop, self._fail, abort)
        # The gRPC ingest of external solvers (when config.ingest.enabled): same token as the gateway.
        self._ingest_token = ingest_token if ingest_token is not None else auth.secret(auth.INGEST)
        self.feed: Any = None  # services.ingest.server.StudyFeed
        self._grpc: Any = None  # the services.ingest.server.SurgeServer it is attached to
        self.ingest_address: str | None = None
        self.fallbacks: Fallbacks | None = None  # once the buffer exists

    # Lifecycle -------------------------------------------------------------------
    def start(self) -> Study:
        """Start the driver thread."""
        self.state = StudyState.STARTING
        self.started_at = time.time()
        self._thread = threading.Thread(target=self._main, name=f"study-{self.id}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ask the study to end: solvers stop, the trainer validates and publishes once more, then ends."""
        if not self._stop.is_set():
            self._stop_at = time.monotonic()
        self._stop.set()
        self._shards_call("abort")

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def actors(self) -> list[ray.actor.ActorHandle]:
        return self.dispatch.actors

    @property
    def done_ids(self) -> list[int]:
        """Simulations completed, in order (over every life of the study, when resumed)."""
        return self.dispatch.done_ids

    @property
    def running(self) -> bool:
        return self.state.active

    # Driver ------------------------------------------------------------------------
    def _main(self) -> None:
        cfg = self.config
        train_error: list[BaseException] = []
        # Each resource registers its own teardown as it is acquired; they run in reverse, whatever happens.
        with contextlib.ExitStack() as teardown:
            teardown.callback(self._end)
            try:
                wait_for_resources(cfg, self._stop)
                if cfg.training.validation_dataset:
                    x_val, y_val = Dataset(cfg.training.validation_dataset).arrays()
                else:
                    x_val, y_val = validation_set(
                        self.spec, cfg.training.validation_simulations, cfg.training.validation_seed
                    )
                self.control = StudyControl.remote()
                teardown.callback(self._collect_ranks)  # after the trainer has ended (it reports at its end)
                if cfg.ingest.enabled:
                    self._start_ingest()
                    teardown.callback(self._stop_ingest)
                problem = self.spec.to_dict()
                # Offline (a dataset): no solvers and no shards; the trainer reads the store.
                n_actors = 0 if cfg.dataset else cfg.solvers.actors
                self.dispatch.actors = [
                    SolverActor.options(num_cpus=cfg.solvers.num_cpus).remote(
                        problem, cfg.solvers.chunk_steps, cfg.training.workers, cfg.solvers.sims_per_call
                    )
                    for _ in range(n_actors)
                ]
                teardown.callback(self._kill_solvers)
                trainer = self._make_trainer(ray.put((x_val, y_val)), validation_fingerprint(x_val, y_val))

                def fit() -> None:
                    try:
                        trainer.fit()
                    except BaseException as e:
                        train_error.append(e)

                trainer_thread = threading.Thread(target=fit, name=f"train-{self.id}", daemon=True)
                trainer_thread.start()
                teardown.callback(self._end_trainer, trainer_thread)
                if not cfg.dataset:
                    self._make_shards(trainer_thread)
                    # Predict fallbacks solve single points as tasks and put them into the buffer like the feed.
                    sink = ShardRouter(
                        None, group=cfg.solvers.sims_per_call, control=self.control, block=cfg.solvers.chunk_steps
                    )
                    self.fallbacks = Fallbacks(self.spec, self.ids, self.dispatch, sink, cfg.solvers.num_cpus)
                    # The shards let go of their chunks (nothing may keep objects alive after a study); the
                    # shard actors stay until release(), so that their counts can be read.
                    teardown.callback(self._shards_call, "drop")
                self.state = StudyState.RUNNING
                threading.Thread(target=self._monitor, name=f"monitor-{self.id}", daemon=True).start()
                if cfg.dataset:
                    while trainer_thread.is_alive() and not self._stop.wait(0.5):
                        pass
                else:
                    self.dispatch.run(lambda: trainer_thread.is_alive())
                # Simulations exhausted (or stop asked): let the trainer drain the buffer and finish.
                if self.feed is not None:
                    self.feed.close("the study needs no more simulations")
                self._shards_call("close")
                self._await_trainer(trainer_thread)
                self._poll()
                if train_error:
                    raise train_error[0]
                if self.error is not None:  # stopped by a limit (too many failed simulations): say so
                    self.state = StudyState.FAILED
                else:
                    self.state = StudyState.STOPPED if self._stop.is_set() else StudyState.FINISHED
            except BaseException as e:
                log.exception("study %s failed", self.id)
                self.error = self.error or f"{type(e).__name__}: {e}"
                self.state = StudyState.FAILED

    def _await_trainer(self, trainer_thread: threading.Thread) -> None:
        """Until the trainer ends; once a stop is asked, for ``training.stop_grace_s`` at most."""
        grace = self.config.training.stop_grace_s
        aborted = False
        while trainer_thread.is_alive():
            trainer_thread.join(0.5)
            if self._stop.is_set():
                if not aborted:  # once: a shard restarted later is aborted again by _poll
                    self._shards_call("abort")
                    aborted = True
                if time.monotonic() - self._stop_at > grace:
                    # Teardown kills the trainer: the last version is the last one published.
                    log.warning("study %s: no last checkpoint within training.stop_grace_s = %g s", self.id, grace)
                    return

    # Teardown, one step per resource (registered as each is acquired) ----------------------
    def _end_trainer(self, trainer_thread: threading.Thread) -> None:
        self._shards_call("abort")
        trainer_thread.join(60)

    def _kill_solvers(self) -> None:
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # gone already
                pass

    def _stop_ingest(self) -> None:
        if self.feed is not None:
            self.feed.close(f"study {self.id} has ended")
        if self._grpc is not None:
            from services.ingest.server import release

            self._grpc.detach(self.feed)
            release(self._grpc)
            self._grpc = None

    def _collect_ranks(self) -> None:
        if self.control is not None:
            try:
                self.rank_states = ray.get(self.control.ranks.remote(), timeout=30)
            except Exception:  # the control actor died with the cluster: nothing to read
                pass

    def _end(self) -> None:
        """Last: the final snapshot is written, and the study's lock and ledger let go."""
        self.ended_at = time.time()
        if self.release_when_done:
            self.release()  # the shard and control processes go; the final counts stay in the snapshot
        self._write_progress()
        self.ids.close()
        self._unlock_driver()

    def _lock_driver(self) -> None:
        """Hold the study's lock file while this process drives it (the kernel lets go when the process dies,
        however it dies): a resume can tell a study whose driver is gone from one that is running."""
        import fcntl

        f = open(self.dir / LOCK_FILE, "a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            f.close()
            raise StudyRunning(f"study {self.id!r} is running (its driver is process {pid})") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lockfile = f

    def _unlock_driver(self) -> None:
        if self._lockfile is not None:
            self._lockfile.close()  # closing the file lets go of the lock
            self._lockfile = None

    def _start_ingest(self) -> None:
        from services.ingest.server import ServerTLS, StudyFeed, serve

        ing = self.config.ingest
        if not self._ingest_token:
            log.warning(
                "study %s: ingest is enabled but SURGE_INGEST_TOKEN is unset; external clients are refused", self.id
            )
        # External simulations come one per stream: each goes whole to its shard.
        sink = ShardRouter(
            None, group=self.config.solvers.sims_per_call, control=self.control, block=self.config.solvers.chunk_steps
        )
        self.feed = StudyFeed(self.id, self.spec, sink, self.ids, ing, self.dispatch.external_event)
        self.dispatch.external_capped = lambda: self.feed is not None and self.feed.cap_reached
        # TLS from the environment of the process that runs the study (on a cluster: the driver's node).
        self._grpc = serve(
            ing.host,
            ing.port,
            token=self._ingest_token,
            max_message_bytes=int(ing.max_message_mb * 2**20),
            tls=ServerTLS.from_env(),
        )
        self._grpc.attach(self.feed)
        self.ingest_address = self._grpc.address
        log.info("study %s: external solvers stream in over gRPC at %s", self.id, self.ingest_address)

    def _make_trainer(self, validation_ref: ray.ObjectRef, validation_key: str | None = None) -> Any:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        t = self.config.training
        inputs = WorkerInputs(
            problem=self.spec.to_dict(),
            control=self.control,
            validation=validation_ref,
            store=self.store_root,
            model_name=self.config.served_name,
            study_id=self.id,
            seed=self.config.sampler.seed,
            dataset=str(Path(self.config.dataset).resolve()) if self.config.dataset else None,
            record_keys=self.record_keys,
            validation_set=validation_key,
            sample_losses=bool(self.sampler.adaptive),
            sampler=self._sampler_card(),
        )
        # Ray Train's own files live with the study's (a store every node of a cluster shares), not in /tmp.
        storage = self.dir / "ray-train"
        # check_resources has made sure that the cluster has a GPU per worker when use_gpu is set.
        self.use_gpu = bool(t.use_gpu)
        return TorchTrainer(
            train_worker,
            train_loop_config={"training": t, "inputs": inputs},
            # NCCL between GPUs, gloo between CPU workers; the device is chosen by Ray Train at run time.
            torch_config=TorchConfig(backend="nccl" if self.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=t.workers, use_gpu=self.use_gpu),
            run_config=RunConfig(
                name=self.id,
                storage_path=str(storage),
                # A rank that dies restarts the worker group from the last checkpoint (one per validation).
                checkpoint_config=CheckpointConfig(num_to_keep=t.checkpoints_kept),
                failure_config=FailureConfig(max_failures=t.max_failures),
            ),
        )

    def _sampler_card(self) -> dict[str, Any]:
        """How the simulations were chosen, as the model card records it."""
        sc = self.config.sampler
        out: dict[str, Any] = {"kind": sc.kind, "seed": sc.seed}
        if sc.breeds:
            out["breed"] = sc.breed_settings()
        if sc.kind == "uncertainty":
            out["uncertainty"] = sc.uncertainty_settings().model_dump()
        if sc.kind == "queries":
            out["queries"] = sc.queries_settings().model_dump()
        return out

    def solve(self, params: np.ndarray, timeout: float) -> tuple[int, np.ndarray]:
        """A predict fallback: ``(sim_id, fields [T+1, C_out, *grid])`` at ``params [P]``, solved on the study's
        cluster now; the simulation joins the training stream. Raises ``FallbackError``."""
        fb = self.fallbacks
        if fb is None or self.state != StudyState.RUNNING or self._stop.is_set():
            raise FallbackUnavailable(f"study {self.id!r} is {self.state.value}: it solves no more simulations")
        return fb.solve(params, timeout)

    def _fail(self, message: str) -> None:
        """Stop the study with an error (the trainer still publishes what it has learnt)."""
        if self.error is None:
            log.error("study %s: %s", self.id, message)
            self.error = message
        self.stop()

    def _monitor(self) -> None:
        while self.running:
            if self.feed is not None:
                self.feed.reap()  # simulations handed out whose client never streamed them
            self._poll()
            time.sleep(1.0)

    def _poll(self) -> None:
        """Read the buffer's (and through it the trainer's) figures; publish the progress file."""
        if self.control is not None:
            try:
                parts = ray.get([s.stats.remote() for s in self.shards], timeout=5)
                parts, restarted = self._shard_counts.update(parts)
                st = {**merge_stats(parts), "training": ray.get(self.control.training.remote(), timeout=5)}
            except Exception:
                st, restarted = None, []
            if self.sampler.adaptive:
                self._feed_sampler()
            if self.config.sampler.kind == "uncertainty":
                self._refresh_scorer()
            for r in restarted:
                log.warning("study %s: buffer shard %d was restarted (the samples it held are lost)", self.id, r)
                if self._buffer_state != "open":  # the new process must end its stream as the old one would have
                    getattr(self.shards[r], "close" if self._buffer_state == "closed" else "abort").remote()
            if st is not None:
                now = time.time()
                prev = self._buffer_stats
                with self._lock:
                    if prev:
                        dt = max(1e-6, now - prev["_time"])
                        offered = st.get("received", 0) + st.get("duplicates", 0)
                        prev_offered = prev.get("received", 0) + prev.get("duplicates", 0)
                        self._rates = {
                            "produced_per_s": (offered - prev_offered) / dt,
                            "consumed_per_s": (st.get("consumed", 0) - prev.get("consumed", 0)) / dt,
                        }
                    self._buffer_stats = {**st, "_time": now}
        self._write_progress()

    def _feed_sampler(self) -> None:
        """Pass the losses the ranks reported since the last poll to the adaptive sampler."""
        try:
            ids, losses = ray.get(self.control.drain_sim_losses.remote(), timeout=5)
        except Exception:  # the control actor is gone (the study is ending): nothing more to learn from
            return
        if ids:
            self.losses_observed += self.ids.observe(np.asarray(ids), np.asarray(losses))

    def _refresh_scorer(self) -> None:
        """Score the uncertainty sampler's candidates with the newest ensemble this study published (loaded at
        most every ``refresh_s``; another study's versions under the same name are not this study's model)."""
        now = time.monotonic()
        if now - self._scorer_checked < self.config.sampler.uncertainty_settings().refresh_s:
            return
        self._scorer_checked = now
        store = ModelStore(self.store_root)
        name = self.config.served_name
        for v in reversed(store.versions(name)):
            if v == self.scorer_version:
                return
            try:
                if store.card(name, v).training.study_id != self.id:
                    continue
                m = store.load(name, v)
            except StoreError as e:  # pruned or half-synced meanwhile: try again at the next refresh
                log.warning("study %s: cannot load version %d to score draws: %s", self.id, v, e)
                return
            self.sampler.set_scorer(lambda pts, m=m, spec=self.spec: point_scores(m.model, m.normaliser, spec, pts))
            self.scorer_version = v
            return

    def _write_progress(self) -> None:
        """The snapshot as a file next to the models: the gateway reads studies (and their metrics) from it,
        whether the study runs in its process or as a Ray job elsewhere."""
        try:
            self.progress_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.progress_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, self.progress_path)
        except OSError as e:  # a full or read-only disk must not stop the study
            log.warning("cannot write %s: %s", self.progress_path, e)

    def release(self) -> None:
        """Free the control actor and the shards (their final counts stay in the last snapshot)."""
        if self.control is not None:
            self._poll()
            for a in [*self.shards, self.control]:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:
                    pass
            self.control, self.shards = None, []

    def _make_shards(self, trainer_thread: threading.Thread) -> None:
        """One buffer shard per trainer rank, on that rank's node, once the ranks have registered."""
        cfg = self.config
        world = cfg.training.workers
        assert self.control is not None
        deadline = time.monotonic() + _RANKS_WAIT_S
        while len(nodes := ray.get(self.control.nodes.remote(), timeout=60)) < world:
            if not trainer_thread.is_alive():
                return  # the trainer failed to start; its error is raised by the caller
            if self._stop.is_set():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {len(nodes)} of {world} trainer workers started within {_RANKS_WAIT_S:.0f} s: "
                    f"the cluster lacks the CPUs/GPUs for training.workers = {world}"
                )
            time.sleep(0.1)
        capacity_bytes = int(cfg.buffer.capacity_mb * 2**20) if cfg.buffer.capacity_mb else None
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.shards = [
            BufferShard.options(
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nodes[r], soft=False),
            ).remote(
                cfg.buffer.policy,
                # Capacity and watermark are the study's; each of the world shards holds its share.
                max(1, cfg.buffer.capacity // world),
                min(cfg.buffer.watermark // world, max(1, cfg.buffer.capacity // world)),
                capacity_bytes // world if capacity_bytes else None,
                cfg.sampler.seed + r,
            )
            for r in range(world)
        ]
        ray.get(self.control.set_shards.remote(self.shards))
        self.dispatch.shards = self.shards
        try:
            self._nodes.update(ray.get([a.node.remote() for a in self.actors], timeout=120))
        except Exception:  # only for the report; a solver that is slow to start is no error
            pass

    def _shards_call(self, method: str, timeout: float = 10.0) -> None:
        """Call ``method`` on every shard and wait for it (bounded): after ``drop`` returns, no chunk is held."""
        if method == "close" and self._buffer_state == "open":
            self._buffer_state = "closed"
        elif method in ("abort", "drop"):
            self._buffer_state = "aborted"
        pending = []
        for s in self.shards:
            try:
                pending.append(getattr(s, method).remote())
            except Exception:  # the actor may already be gone
                pass
        if pending:
            ray.wait(pending, num_returns=len(pending), timeout=timeout)

    # Reading -------------------------------------------------------------------------
    def received_by_sim(self) -> dict[int, int]:
        """``{sim_id: distinct time indices received}`` over every shard (a simulation lives on one)."""
        out: dict[int, int] = {}
        for part in ray.get([s.received_by_sim.remote() for s in self.shards]):
            for k, v in part.items():
                out[k] = out.get(k, 0) + v
        return out

    def snapshot(self) -> dict[str, Any]:
        """The study's ``StudySnapshot``, as plain JSON types."""
        with self._lock:
            st = dict(self._buffer_stats)
            rates = dict(self._rates)
            nodes = sorted(self._nodes)
        fig = self.dispatch.figures()
        sims, ext_sims = fig["simulations"], fig["external"]
        produced, external = fig["produced"], fig["produced_external"]
        tr = st.get("training", {})
        # The buffer counts every sample offered at once; the actors report theirs when a call ends.
        offered = st.get("received", 0) + st.get("duplicates", 0)
        by_actors = max(produced, offered - external)
        elapsed = ((self.ended_at or time.time()) - self.started_at) if self.started_at else 0.0
        t = self.config.training
        return StudySnapshot(
            id=self.id,
            name=self.config.name,
            model_name=self.config.served_name,
            state=self.state,
            error=self.error,
            device="gpu" if self.use_gpu else "cpu",
            started_at=self.started_at,
            updated_at=time.time(),
            nodes=Nodes(solvers=nodes, trainers=sorted(tr.get("nodes", []))),
            elapsed_s=elapsed,
            simulations=SimulationCounts(
                **sims,
                budget=self.config.simulations,
                external_done=ext_sims["done"],
                external_failed=ext_sims["failed"],
            ),
            samples=SampleCounts(
                produced=by_actors + external,
                produced_actors=by_actors,
                produced_external=external,
                received=st.get("received", 0),
                duplicates=st.get("duplicates", 0),
                consumed=st.get("consumed", 0),
                **rates,
            ),
            buffer=BufferFigures(
                policy=self.config.buffer.policy,
                held=st.get("held", 0),
                capacity=st.get("capacity", self.config.buffer.capacity),
                watermark_reached=st.get("watermark_reached", False),
                evicted=st.get("evicted", 0),
                restarts=self._shard_counts.restarts,
            ),
            training=TrainingFigures(
                step=tr.get("step", 0),
                steps=t.steps,
                loss=_finite(tr.get("loss")),
                validation_error=_finite(tr.get("validation_error")),
                samples_seen=tr.get("samples_seen", 0),
                data_wait_s=tr.get("data_wait_s", 0.0),
                compute_s=tr.get("compute_s", 0.0),
                version=tr.get("version"),
                history=tr.get("history", []),
                restarts=tr.get("restarts", 0),
                resumed_at=tr.get("resumed_at", []),
            ),
            sampler=SamplerFigures(
                kind=self.config.sampler.kind,
                losses_observed=self.losses_observed,
                bred_fraction=self.sampler.fraction() if self.config.sampler.breeds else None,
                scored=getattr(self.sampler, "scored", 0),
                scorer_version=self.scorer_version,
                queried=getattr(self.sampler, "queried", 0),
                query_points=len(self.sampler.points) if isinstance(self.sampler, QuerySampler) else 0,
            ),
            ingest=self.feed.stats() if self.feed is not None else None,
        ).to_dict()


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None


class ResourcesError(RuntimeError):
    """The study asks for more than the Ray cluster has: it could never be placed."""


def check_resources(cfg: StudyConfig, cluster: dict[str, float]) -> None:
    """Fail in seconds, naming what is missing, where Ray would leave actors pending for ever.

    Counted against the cluster's total (what exists), not what is free: a study that fits waits
    for others to end; one that does not fit never starts.
    """
    t = cfg.training
    actors = 0 if cfg.dataset else cfg.solvers.actors
    missing = []
    if t.use_gpu:
        gpus = float(cluster.get("GPU", 0))
        if t.workers > gpus:
            missing.append(
                f"{t.workers} GPUs (training.workers: {t.workers} with use_gpu), the Ray cluster has {gpus:g}"
                + ("; set training.use_gpu: false to train on CPUs" if gpus == 0 else "")
            )
    cpus = float(cluster.get("CPU", 0))
    # Each Ray Train worker takes one CPU (with or without a GPU), each solver actor solvers.num_cpus.
    need = actors * cfg.solvers.num_cpus + t.workers
    if need > cpus:
        missing.append(
            f"{need:g} CPUs ({actors} solver actors x {cfg.solvers.num_cpus:g} + {t.workers} trainer workers),"
            f" the Ray cluster has {cpus:g}"
        )
    store = float(cluster.get("object_store_memory", 0))
    if not cfg.dataset and store > 0:
        # The buffer's samples live in the object store (the shards hold references): its capacity in
        # bytes, or in samples at this problem's sample size, must fit in what the cluster has.
        spec = cfg.problem.spec()
        per_sample = 4 * (int(np.prod(spec.in_shape)) + int(np.prod(spec.out_shape)))
        by_samples = cfg.buffer.capacity * per_sample
        need_b = min(by_samples, cfg.buffer.capacity_mb * 2**20) if cfg.buffer.capacity_mb else by_samples
        if need_b > store:
            missing.append(
                f"{need_b / 2**20:.0f} MB of object store for the buffer (buffer.capacity {cfg.buffer.capacity}"
                f" samples x {per_sample} bytes), the Ray cluster has {store / 2**20:.0f} MB;"
                " lower buffer.capacity or set buffer.capacity_mb"
            )
    if missing:
        raise ResourcesError("the study needs " + "; and ".join(missing))


CONFIG_FILE = "config.json"  # the study's validated config, as submitted
LEDGER_FILE = "ledger.jsonl"  # the simulation ledger's journal (services.ledger)
LOCK_FILE = "driver.lock"  # held by the process that drives the study


def study_dir(store_root: str | Path, study_id: str) -> Path:
    """Where a study keeps its durable state: config, ledger, training checkpoints, Ray Train's files."""
    return Path(store_root) / PROGRESS_DIR / study_id


class StudyExists(RuntimeError):
    """A new study under the id of one that exists."""


class StudyRunning(RuntimeError):
    """A study that another driver (alive) is running."""


class StudyNotResumable(RuntimeError):
    """A study that cannot be resumed: finished, or its durable state unreadable."""


def resumable(store_root: str | Path, study_id: str, ingest_token: str | None = None) -> Study | None:
    """The study ``study_id`` of the store, ready to ``start()`` where its driver stopped; None if there is none.

    Its config and ledger come from its directory; training goes on from the last checkpoint there.
    Raises ``StudyNotResumable`` for a study that finished or whose state cannot be read.
    """
    cfg = resumable_config(store_root, study_id)
    if cfg is None:
        return None
    try:
        return Study(cfg, store_root, study_id=study_id, ingest_token=ingest_token, resume=True)
    except LedgerError as e:
        raise StudyNotResumable(str(e)) from None


def resumable_config(store_root: str | Path, study_id: str) -> StudyConfig | None:
    """The config of a study of the store that may be resumed; None if there is no such study."""
    from services.config import ConfigError, parse_config

    d = study_dir(store_root, study_id)
    if "/" in study_id or study_id.startswith(".") or not (d / CONFIG_FILE).is_file():
        return None
    try:
        cfg = parse_config(json.loads((d / CONFIG_FILE).read_text()), str(d / CONFIG_FILE))
    except (OSError, ValueError, ConfigError) as e:
        raise StudyNotResumable(f"cannot read the config of study {study_id!r}: {e}") from None
    try:
        last = json.loads((d.parent / f"{study_id}.json").read_text()).get("state")
    except (OSError, ValueError):
        last = None
    if last == StudyState.FINISHED:
        raise StudyNotResumable(f"study {study_id!r} has finished: there is nothing to resume")
    return cfg


def wait_for_resources(cfg: StudyConfig, stop: threading.Event, poll_s: float = 2.0) -> None:
    """``check_resources`` against the cluster, at once or, with ``resources_timeout_s`` (an autoscaler
    adds nodes on demand), again until the cluster has grown enough or the time is up."""
    deadline = time.monotonic() + cfg.resources_timeout_s
    while True:
        try:
            check_resources(cfg, ray.cluster_resources())
            return
        except ResourcesError as e:
            if cfg.resources_timeout_s <= 0:
                raise
            if time.monotonic() >= deadline or stop.is_set():
                waited = f"after waiting resources_timeout_s = {cfg.resources_timeout_s:g} s"
                raise ResourcesError(f"{e} ({waited})") from None
            log.info("waiting for the cluster to grow: %s", e)
            stop.wait(poll_s)


class StudyLimitError(RuntimeError):
    """Too many studies running already."""


class StudiesUnavailable(RuntimeError):
    """The Ray cluster that runs studies cannot be reached."""


class StudyBackend(Protocol):
    """What the gateway needs from whatever runs studies; every call returns snapshots."""

    def submit(self, config: StudyConfig) -> dict[str, Any]: ...

    def status(self, study_id: str) -> dict[str, Any] | None: ...

    def statuses(self) -> list[dict[str, Any]]: ...

    def cancel(self, study_id: str) -> dict[str, Any] | None: ...

    def resume(self, study_id: str) -> dict[str, Any] | None: ...


class StudyManager:
    """Studies run by this process on the Ray it is connected to (the embedded mode), by id."""

    def __init__(self, store_root: str | Path, max_running: int = 2, ingest_token: str | None = None) -> None:
        self.store_root = Path(store_root)
        self.max_running = max_running
        self.ingest_token = ingest_token
        self._studies: dict[str, Study] = {}
        self._lock = threading.Lock()

    def start(self, config: StudyConfig) -> Study:
        with self._lock:
            running = sum(s.running for s in self._studies.values())
            if running >= self.max_running:
                raise StudyLimitError(f"{running} studies are running already (limit {self.max_running})")
            study = Study(config, self.store_root, ingest_token=self.ingest_token)
            study.release_when_done = True
            self._studies[study.id] = study
            # Started under the lock (start only launches its thread): counted as running before
            # a concurrent start counts, so that two requests cannot both take the last place.
            return study.start()

    def resume(self, study_id: str) -> dict[str, Any] | None:
        """Go on with a study of the store whose driver stopped (this process's, or one that died)."""
        with self._lock:
            old = self._studies.get(study_id)
            if old is not None and old.running:
                raise StudyRunning(f"study {study_id!r} is running")
            running = sum(s.running for s in self._studies.values())
            if running >= self.max_running:
                raise StudyLimitError(f"{running} studies are running already (limit {self.max_running})")
            # Raises StudyRunning while another process drives it.
            study = resumable(self.store_root, study_id, ingest_token=self.ingest_token)
            if study is None:
                return None
            study.release_when_done = True
            self._studies[study_id] = study.start()
        return study.snapshot()

    def get(self, study_id: str) -> Study | None:
        return self._studies.get(study_id)

    def list(self) -> list[Study]:
        return list(self._studies.values())

    def solve(
        self, model: str, param_names: tuple[str, ...], params: np.ndarray, timeout: float
    ) -> tuple[int, np.ndarray]:
        """A predict fallback for ``model``: solved by the newest running study that trains it (``Study.solve``)."""
        mine = [s for s in self._studies.values() if s.running and s.config.served_name == model]
        if not mine:
            raise FallbackUnavailable(
                f"no study of model {model!r} is running in this gateway: nothing can solve the point"
            )
        study = max(mine, key=lambda s: s.started_at or 0.0)
        if tuple(study.spec.params.names) != tuple(param_names):
            raise FallbackUnavailable(
                f"study {study.id!r} of model {model!r} takes parameters {list(study.spec.params.names)}, "
                f"not the served model's {list(param_names)}"
            )
        return study.solve(params, timeout)

    def stop_all(self, timeout: float = 60) -> None:
        for s in self._studies.values():
            s.stop()
        for s in self._studies.values():
            s.join(timeout)

    # The gateway's view: snapshots, whatever runs the study.
    def submit(self, config: StudyConfig) -> dict[str, Any]:
        return self.start(config).snapshot()

    def status(self, study_id: str) -> dict[str, Any] | None:
        s = self.get(study_id)
        return s.snapshot() if s is not None else None

    def statuses(self) -> list[dict[str, Any]]:
        return [s.snapshot() for s in self.list()]

    def cancel(self, study_id: str) -> dict[str, Any] | None:
        s = self.get(study_id)
        if s is None:
            return None
        s.stop()
        return s.snapshot()
