"""Exports on a PostgreSQL registry: concurrent direct exports, the batched writer, its crash recovery.

Correctness only (every dataset once, reruns add nothing, a writer killed mid-batch loses
nothing); the throughput is `scripts/bench_export.py`'s job.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from workflow.core.config import load_config
from workflow.core.exceptions import ConfigError, NonRetriableError
from workflow.core.instrument import instrument_for_run
from workflow.repo.central_repo import create_central_repo, open_central_repo, register_instrument
from workflow.repo.export_batch import ExportRequest, ExportWriter, pending_requests, receipts
from workflow.sim.exposures import make_exposures
from workflow.sim.simulate import raw_header
from workflow.stages.export import (
    OUTPUT_DATASET_TYPES,
    config_hashes,
    export_mode,
    export_outputs,
    output_chain,
    output_run,
)

DAY_OBS, PIPELINE = "2025-01-08", "ApPipe"
N_DETECTORS = 4


@pytest.fixture
def setup(postgres_server, tmp_path: Path) -> dict[str, Any]:
    """A central repo with a PostgreSQL registry (own schema), and the products of one visit on 4 detectors."""
    config = load_config(instrument="LSSTComCamSim", overrides={"simulation": {"scale": 0.05, "seed": 0}})
    config["central_repo"] = str(tmp_path / "repo")
    config["export"] = {**config["export"], "spool_dir": str(tmp_path / "spool")}
    instrument = instrument_for_run(config)
    butler = create_central_repo(
        config["central_repo"], registry_url=postgres_server.url, registry_namespace=f"t{uuid.uuid4().hex[:12]}"
    )
    register_instrument(butler, instrument)
    butler.close()  # forked exports must not share this process's connections
    (info,) = make_exposures(
        instrument,
        start="2025-01-09T02:00:00.000",
        seq_num=7,
        ra=150.0,
        dec=2.0,
        rotation_deg=0.0,
        physical_filter=next(iter(instrument.filters)),
        n_snaps=1,
    )
    targets = []
    for det in [d.id for d in instrument.detectors][:N_DETECTORS]:
        header = raw_header(instrument, det, info)
        targets.append(
            {
                "detector": det,
                "header": {k: header[k] for k in header if k not in ("COMMENT", "HISTORY", "")},
                "outputs": _products(tmp_path / "products" / str(det), det),
            }
        )
    return {"config": config, "targets": targets, "visit": info.exposure_id, "tmp": tmp_path}


def _products(directory: Path, detector: int) -> dict[str, str]:
    """The five exported products of one detector-visit; each file's content names the detector."""
    directory.mkdir(parents=True)
    out = {}
    for name in ("preliminary_visit_image", "difference_image"):
        out[name] = str(directory / f"{name}.fits")
        fits.HDUList([fits.PrimaryHDU(np.full((4, 4), detector, np.float32))]).writeto(out[name])
    for name in ("single_visit_star", "dia_source_unfiltered"):
        out[name] = str(directory / f"{name}.parquet")
        pd.DataFrame({"id": [detector * 10 + 1, detector * 10 + 2], "ra": [150.1, 150.2]}).to_parquet(out[name])
    out["pipeline_metadata"] = str(directory / "pipeline_metadata.json")
    Path(out["pipeline_metadata"]).write_text(json.dumps({"pipeline": PIPELINE, "detector": detector}))
    return out


def _export(args: tuple[dict, dict]) -> dict:
    config, target = args
    return export_outputs(
        config,
        day_obs=DAY_OBS,
        pipeline=PIPELINE,
        outputs=target["outputs"],
        raw_header=target["header"],
        where=f"detector {target['detector']}",
    )


def _export_all(config: dict, targets: list[dict]) -> list[dict]:
    """Export every target at once, one process each.

    The processes come from a forkserver (forked from a clean single-threaded
    process, as the stage server forks stages): forking pytest itself, which runs
    server threads, once left a child stuck on a lock it inherited held.  A bounded
    wait turns any hang into a failure.
    """
    with multiprocessing.get_context("forkserver").Pool(len(targets)) as pool:
        return pool.map_async(_export, [(config, t) for t in targets]).get(timeout=300)


def _with_mode(config: dict, mode: str) -> dict:
    return {**config, "export": {**config["export"], "mode": mode}}


def _assert_each_dataset_once(config: dict, visit: int, detectors: list[int]) -> None:
    butler = open_central_repo(config["central_repo"])
    chain = output_chain("LSSTComCamSim", DAY_OBS)
    assert list(butler.registry.getCollectionChain(chain)) == [output_run(config, DAY_OBS, PIPELINE)]
    for name in OUTPUT_DATASET_TYPES:
        refs = butler.query_datasets(name, collections=chain, find_first=False, limit=None, explain=False)
        keys = sorted((int(r.dataId["visit"]), int(r.dataId["detector"])) for r in refs)
        assert keys == [(visit, d) for d in sorted(detectors)], name
    for ref in butler.query_datasets("difference_image", collections=chain, limit=None, explain=False):
        assert float(butler.get(ref)[0].data[0, 0]) == ref.dataId["detector"]
    for ref in butler.query_datasets("dia_source_unfiltered", collections=chain, limit=None, explain=False):
        det = int(ref.dataId["detector"])
        assert list(butler.get(ref)["id"]) == [det * 10 + 1, det * 10 + 2]
    for ref in butler.query_datasets("pipeline_metadata", collections=chain, limit=None, explain=False):
        assert butler.get(ref)["detector"] == ref.dataId["detector"]


def _writer(config: dict, **kwargs: Any) -> ExportWriter:
    return ExportWriter(config["central_repo"], config["export"]["spool_dir"], instrument_for_run(config), **kwargs)


def _drain(writer: ExportWriter) -> int:
    committed = 0
    while (result := writer.drain_once()) is not None:
        committed += result.requests
    return committed


def test_concurrent_direct_exports_on_postgres_store_each_dataset_once_and_rerun_adds_nothing(setup):
    config, targets = _with_mode(setup["config"], "direct"), setup["targets"]
    records = _export_all(config, targets)
    assert all(sorted(r["exported"]) == sorted(OUTPUT_DATASET_TYPES) for r in records)
    again = _export_all(config, targets)
    assert all(r["exported"] == [] and sorted(r["skipped"]) == sorted(OUTPUT_DATASET_TYPES) for r in again)
    _assert_each_dataset_once(config, setup["visit"], [t["detector"] for t in targets])


def test_batched_exports_are_ingested_once_and_a_resubmission_is_skipped(setup):
    config, targets = _with_mode(setup["config"], "batched"), setup["targets"]
    records = _export_all(config, targets)
    assert all(r["exported"] == [] and r["queued"] == sorted(OUTPUT_DATASET_TYPES) for r in records)
    spool = Path(config["export"]["spool_dir"])
    assert len(pending_requests(spool)) == N_DETECTORS
    writer = _writer(config)
    assert _drain(writer) == N_DETECTORS
    assert pending_requests(spool) == [] and list((spool / "files").iterdir()) == []
    done = receipts(spool)
    assert sorted(done) == sorted(r["request"] for r in records)
    assert all(sorted(r.exported) == sorted(OUTPUT_DATASET_TYPES) for r in done.values())
    _export(({**config}, targets[0]))  # the same target again: its request comes back
    assert _drain(_writer(config)) == 1
    receipt = receipts(spool, [records[0]["request"]])[records[0]["request"]]
    assert receipt.exported == [] and sorted(receipt.skipped) == sorted(OUTPUT_DATASET_TYPES)
    _assert_each_dataset_once(config, setup["visit"], [t["detector"] for t in targets])


def _killed_writer(config: dict) -> None:
    """Run a writer that SIGKILLs itself once the datastore holds the batch's files, before the commit."""

    def open_butler(repo: str) -> Any:
        butler = open_central_repo(repo, writeable=True)
        ingest = butler._datastore.ingest

        def ingest_then_die(*args: Any, **kwargs: Any) -> None:
            ingest(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        butler._datastore.ingest = ingest_then_die
        return butler

    _drain(_writer(config, open_butler=open_butler))


def test_writer_killed_mid_batch_loses_nothing_and_the_restart_stores_each_dataset_once(setup):
    config, targets = _with_mode(setup["config"], "batched"), setup["targets"]
    _export_all(config, targets)
    child = multiprocessing.get_context("forkserver").Process(target=_killed_writer, args=(config,))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    butler = open_central_repo(config["central_repo"])
    run = output_run(config, DAY_OBS, PIPELINE)
    assert butler.query_datasets("difference_image", collections=run, explain=False) == []  # rolled back
    assert any(Path(config["central_repo"], run).rglob("*.fits"))  # but its files were written: orphans
    assert len(pending_requests(config["export"]["spool_dir"])) == N_DETECTORS
    assert _drain(_writer(config)) == N_DETECTORS
    _assert_each_dataset_once(config, setup["visit"], [t["detector"] for t in targets])


def test_unreadable_request_is_set_aside_and_the_others_proceed(setup):
    config, targets = _with_mode(setup["config"], "batched"), setup["targets"][:1]
    spool = Path(config["export"]["spool_dir"])
    _export_all(config, targets)
    (spool / "pending" / "bad.json").write_text(json.dumps({"schema_version": 99}))
    assert _drain(_writer(config)) == 1
    failed = json.loads((spool / "failed" / "bad.json").read_text())
    assert "schema_version 99" in failed["reason"] and pending_requests(spool) == []
    with pytest.raises(NonRetriableError, match="not an export request"):
        ExportRequest.from_json("[]", path="x.json")


def test_export_mode_is_checked_and_does_not_change_the_run_name():
    config = load_config(instrument="LSSTComCamSim")
    assert export_mode(config) == "direct"  # auto: direct outside the shim
    assert export_mode(_with_mode(config, "auto")) == "direct"
    assert export_mode(_with_mode(config, "direct")) == "direct"
    batched = _with_mode(config, "batched")
    assert export_mode(batched) == "batched"
    assert config_hashes(batched) == config_hashes(config)
    with pytest.raises(ConfigError, match="export.mode"):
        export_mode(_with_mode(config, "sometimes"))


def test_export_writer_cli_drains_the_configured_spool_and_exits_when_idle(setup, monkeypatch):
    import yaml

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "scripts"))
    import export_writer

    config, targets = _with_mode(setup["config"], "batched"), setup["targets"][:2]
    _export_all(config, targets)
    site = setup["tmp"] / "site.yaml"
    # The spool relative to the run directory, as the shim's writer finds it (not to the repo).
    spool = Path(config["export"]["spool_dir"])
    monkeypatch.chdir(spool.parent)
    export = {**config["export"], "spool_dir": spool.name}
    site.write_text(
        yaml.safe_dump({"central_repo": config["central_repo"], "export": export, "simulation": config["simulation"]})
    )
    args = ["--instrument", "LSSTComCamSim", "--extra-config", str(site), "--idle-exit-s", "0.5"]
    assert export_writer.main(args) == 0
    assert pending_requests(spool) == [] and len(list((spool / "done").glob("*.json"))) == len(targets)
    butler = open_central_repo(config["central_repo"])
    run = output_run(config, DAY_OBS, PIPELINE)
    refs = butler.query_datasets("single_visit_star", collections=run, limit=None, explain=False)
    assert sorted(int(r.dataId["detector"]) for r in refs) == sorted(t["detector"] for t in targets)


def test_a_poison_request_is_set_aside_and_does_not_block_the_others(setup):
    config, targets = _with_mode(setup["config"], "batched"), setup["targets"][:2]
    bad = {**targets[1], "header": {**targets[1]["header"], "EXPID": setup["visit"] + 1, "FILTER": "no-such-filter"}}
    _export_all(config, [*targets, bad])
    spool = Path(config["export"]["spool_dir"])
    writer = _writer(config)
    for _ in range(4):  # the bad request alone is retried (it might be an outage) until its attempts run out
        writer.drain_once()
    assert pending_requests(spool) == []
    (failed,) = [json.loads(p.read_text()) for p in (spool / "failed").glob("*.json")]
    assert failed["request"].startswith(f"LSSTComCamSim-{setup['visit'] + 1}-")
    butler = open_central_repo(config["central_repo"])
    refs = butler.query_datasets("difference_image", collections=output_run(config, DAY_OBS, PIPELINE), explain=False)
    assert sorted((int(r.dataId["visit"]), int(r.dataId["detector"])) for r in refs) == [
        (setup["visit"], t["detector"]) for t in targets
    ]
