"""Tests for `workflow.stages.export`: run naming, selection, idempotency, concurrent exports."""

from __future__ import annotations

import json
import multiprocessing

import numpy as np
import pandas as pd
import pytest
import yaml
from astropy.io import fits

from workflow.core.config import load_config
from workflow.repo.central_repo import open_central_repo, raw_collection
from workflow.sim.demo_repo import build_demo_repo
from workflow.stages.export import config_hashes, export_outputs, output_chain, output_run, select_outputs

SCALE = 0.05


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny central repo with the raws of one visit on two detectors."""
    root = tmp_path_factory.mktemp("export")
    site = root / "site.yaml"
    site.write_text(yaml.safe_dump({"central_repo": str(root / "repo"), "simulation": {"scale": SCALE, "seed": 0}}))
    config = load_config(instrument="LSSTComCamSim", extra_files=[site])
    build_demo_repo(config["central_repo"], ["LSSTComCamSim"], n_visits=1, scale=SCALE, n_detectors=2, progress=False)
    butler = open_central_repo(config["central_repo"])
    refs = butler.query_datasets("raw", collections=raw_collection("LSSTComCamSim"), limit=None, explain=False)
    headers = {ref.dataId["detector"]: dict(butler.get(ref)[0].header) for ref in refs}
    return config, root, headers


def _outputs(directory, detector: int) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "difference_image.fits"
    fits.HDUList([fits.PrimaryHDU(np.full((4, 4), detector, np.float32))]).writeto(image, overwrite=True)
    table = directory / "dia_source_unfiltered.parquet"
    pd.DataFrame({"diaSourceId": [detector * 10 + 1], "ra": [150.1]}).to_parquet(table)
    meta = directory / "pipeline_metadata.json"
    meta.write_text(json.dumps({"pipeline": "ApPipe", "detector": detector}))
    unselected = directory / "post_isr_image.fits"
    unselected.write_bytes(image.read_bytes())
    return {
        "difference_image": str(image),
        "dia_source_unfiltered": str(table),
        "pipeline_metadata": str(meta),
        "post_isr_image": str(unselected),
    }


def test_run_names_are_deterministic_and_change_with_config():
    config = load_config(instrument="LSSTComCamSim")
    run = output_run(config, "2026-11-27", "ApPipe")
    assert run.startswith("LSSTComCamSim/prompt/output-2026-11-27/ApPipe/pipelines-")
    assert run == output_run(load_config(instrument="LSSTComCamSim"), "2026-11-27", "ApPipe")
    changed = {**config, "pipeline_definitions": {**config["pipeline_definitions"], "Isr": ["isr", "calibrate"]}}
    assert config_hashes(changed)[0] != config_hashes(config)[0]
    assert output_chain("HSC", "2026-11-27") == "HSC/prompt/output-2026-11-27"


def test_select_outputs_uses_export_patterns():
    outputs = {"difference_image": "a", "post_isr_image": "b", "dia_source_unfiltered": "c"}
    assert select_outputs(outputs, ["^difference_image$", "^dia_source.*"]) == {
        "difference_image": "a",
        "dia_source_unfiltered": "c",
    }


def _export(config, root, header, detector) -> dict:
    return export_outputs(
        config,
        day_obs="2025-01-09",
        pipeline="ApPipe",
        outputs=_outputs(root / f"out-{detector}", detector),
        raw_header=header,
        where=f"detector {detector}",
    )


def _export_in_process(args) -> dict:
    config, root, header, detector = args
    return _export(config, root, header, detector)


def test_concurrent_exports_and_rerun_export_each_dataset_once(repo):
    config, root, headers = repo
    detectors = sorted(headers)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        records = pool.map(_export_in_process, [(config, root, headers[d], d) for d in detectors])
    for record in records:
        assert sorted(record["exported"]) == ["dia_source_unfiltered", "difference_image", "pipeline_metadata"]
    again = _export(config, root, headers[detectors[0]], detectors[0])
    assert again["exported"] == [] and len(again["skipped"]) == 3
    butler = open_central_repo(config["central_repo"])
    chain = output_chain("LSSTComCamSim", "2025-01-09")
    refs = butler.query_datasets("difference_image", collections=chain, limit=None, explain=False)
    assert sorted(ref.dataId["detector"] for ref in refs) == detectors
    image = butler.get(refs[0])
    assert float(image[0].data[0, 0]) == refs[0].dataId["detector"]
