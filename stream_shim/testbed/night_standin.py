"""The night simulator's stand-in workflow: the real rule shape, stages that only take time.

`CostModel` says how long each stage takes (seconds of sleep, or of a busy loop);
`write_standin_snakefile` writes a Snakefile of the same shape as the project's
(six rules ``prep``, ``ingest``, ``pipeline``, ``export``, ``apdb``, ``finish``, the
same wildcards, inputs, ``group`` and priorities, the job rate limiter switched off
on start) whose jobs are plain bash: no stage server, no Python.  The shim runs it
through its ``--snakefile`` option, so the real shim, submitter Snakemake, broker
and S3 carry it.

Every job writes ``{"start": t0, "end": t1}`` (unix seconds, bash's
``$EPOCHREALTIME``, the clock the camera driver uses) into its output and appends
one line ``<stage> <t0> <t1>`` to the target's ``runs.log``, so the report can tell
how long each job waited for its turn and whether any stage ran twice.

The stand-in *ingest* waits for its raw the way the real one does: it polls the
shim's arrival index (``$PROMPT_SNAKE_ARRIVALS_DIR``, filled from the raw bucket's
notifications) every ``ingest.poll_interval_s``.  Which index entry is its raw the
camera driver wrote beforehand to ``night/expect/{group}.txt`` (``<detector>
<entry path>`` lines; the real ingest matches the raws' headers instead).  A raw that
does not arrive within ``raw_timeout_s`` fails the job, hence the target.

With ``fetch_raw`` the stand-in *ingest* also reads its raw from the raw bucket
(``curl`` with SigV4, the ``AWS_*`` credentials of the job's environment, the
config's ``storage.endpoint_url`` and ``buckets.raw``), riding through S3 errors
at the poll interval until the same deadline, as the real ingest does; its record
then counts the failed reads (``s3_errors``).  ``prelude`` and ``extra_inputs``
add code and named inputs to the Snakefile (the fault suite's crafted poison
target, `stream_shim.testbed.fault_standin`).
"""

from __future__ import annotations

__all__ = ["COST_MODELS", "STAGE_NAMES", "CostModel", "EXPECT_DIR", "write_standin_snakefile"]

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

STAGE_NAMES = ("prep", "ingest", "pipeline", "export", "apdb", "finish")
"""The rules, in the project's order."""
EXPECT_DIR = "night/expect"
"""Under the run directory: ``{group}.txt``, each detector's arrival index entry."""
PRIORITY = {"prep": 50, "apdb": 40, "pipeline": 30, "ingest": 20, "export": 10, "finish": 0}
"""The project's rule priorities (``rules/common.smk``)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostModel:
    """Seconds each stand-in stage takes.

    Attributes
    ----------
    name : `str`
        Name (a key of `COST_MODELS`, or ``custom``).
    kind : `str`
        ``sleep`` (wall time only: hundreds of jobs fit on 2 cores) or ``spin``
        (a busy loop: each job holds a core).
    seconds : `dict` [`str`, `float`]
        Per stage; *ingest*'s counts from the arrival of its raw.
    """

    name: str
    kind: str = "sleep"
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in ("sleep", "spin"):
            raise ValueError(f"cost model {self.name}: kind {self.kind!r}: expected 'sleep' or 'spin'")
        unknown = set(self.seconds) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(f"cost model {self.name}: unknown stage(s) {sorted(unknown)}; expected {STAGE_NAMES}")
        for stage, value in self.seconds.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"cost model {self.name}: {stage}: {value!r} is not a number of seconds >= 0")

    def of(self, stage: str) -> float:
        """Return the seconds of ``stage`` (0 if the model does not name it)."""
        return float(self.seconds.get(stage, 0.0))

    def after_raw_s(self) -> float:
        """Return the modelled seconds from the raw's arrival to the alert: ingest + pipeline + apdb."""
        return self.of("ingest") + self.of("pipeline") + self.of("apdb")

    def to_dict(self) -> dict[str, Any]:
        """Return the model as a JSON-able mapping."""
        return {"name": self.name, "kind": self.kind, "seconds": {s: self.of(s) for s in STAGE_NAMES}}

    @classmethod
    def parse(cls, text: str) -> CostModel:
        """Return the model named ``text`` (`COST_MODELS`), or the one its JSON describes.

        The JSON form is ``{"kind": "sleep", "prep": 1, ...}`` (stages missing: 0 s),
        optionally ``"base": "<name>"`` to start from a named model.

        Raises
        ------
        ValueError
            If ``text`` is neither a known name nor a valid JSON object.
        """
        if text in COST_MODELS:
            return COST_MODELS[text]
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError(f"cost model {text!r}: neither one of {sorted(COST_MODELS)} nor JSON") from None
        if not isinstance(data, dict):
            raise ValueError(f"cost model {text!r}: JSON must be an object")
        base = COST_MODELS.get(str(data.pop("base", "")), CostModel(name="custom", seconds={}))
        kind = str(data.pop("kind", base.kind))
        return cls(name="custom", kind=kind, seconds={**base.seconds, **data})


COST_MODELS: dict[str, CostModel] = {
    "lsstcam-sleep": CostModel(
        name="lsstcam-sleep",
        seconds={"prep": 1.0, "ingest": 0.0, "pipeline": 13.0, "export": 1.0, "apdb": 1.5, "finish": 0.0},
    ),
    "quick-sleep": CostModel(
        name="quick-sleep",
        seconds={"prep": 0.5, "ingest": 0.0, "pipeline": 2.0, "export": 0.3, "apdb": 0.3, "finish": 0.0},
    ),
    "zero": CostModel(name="zero", seconds={}),
}
"""Named cost models; ``lsstcam-sleep`` is the default."""


_HEADER = """\
# Written by stream_shim.testbed.night_standin: the night simulator's stand-in workflow.
# Same rules, wildcards, inputs, group and priorities as the project's; jobs only take time.
from workflow.core.identifiers import PATTERNS
from workflow.runtime.snakemake_tuning import disable_job_rate_limiter

shell.executable("/bin/bash")

TAIL = "{{instrument}}/{{day_obs}}/{{group}}/{{detector}}"
VISIT_FILE = {visits!r} + "/" + TAIL + ".json"
WORK = {work!r} + "/" + TAIL
RESULT = {results!r} + "/" + TAIL


wildcard_constraints:
    instrument=PATTERNS["instrument"],
    day_obs=PATTERNS["day_obs"],
    group=PATTERNS["group"],
    detector=PATTERNS["detector"],


onstart:
    disable_job_rate_limiter(workflow)

"""

# bash: wait without forking `sleep` (read on a pipe nobody writes times out).
_NAP = 'exec {{nap}}<> <(:); nap() {{ read -t "$1" -u "$nap" _ || true; }}; '
_START = 'export LC_ALL=C; t0=$EPOCHREALTIME; extra=""; '
_END = (
    "t1=$EPOCHREALTIME; "
    'printf \'{{"start": %s, "end": %s%s}}\\n\' "$t0" "$t1" "$extra" > {output:q}; '
    'echo "@STAGE@ $t0 $t1" >> {params.runs:q}'
)


def _spend(seconds: float, kind: str) -> str:
    if seconds <= 0:
        return ""
    if kind == "sleep":
        return f"sleep {seconds:g}; "
    micro = int(round(seconds * 1e6))
    return f"end=$(( ${{{{EPOCHREALTIME/./}}}} + {micro} )); while (( ${{{{EPOCHREALTIME/./}}}} < end )); do :; done; "


def _fetch_raw(poll_s: float, timeout_s: float, polls: int) -> str:
    """Bash: GET the raw named by ``$entry`` from ``{params.raw_s3}`` until it works (polls shared with the wait)."""
    key = r'key=${{entry##*/}}; key=${{key%.json}}; key=$(printf %b "${{key//%/\\x}}"); '
    get = (
        "curl -sf --connect-timeout 2 --max-time 5 "
        '--aws-sigv4 "aws:amz:${{AWS_DEFAULT_REGION:-us-east-1}}:s3" '
        '--user "${{AWS_ACCESS_KEY_ID:-}}:${{AWS_SECRET_ACCESS_KEY:-}}" '
        '-o /dev/null {params.raw_s3:q}/"$key"'
    )
    return (
        key
        + "s3_errors=0; "
        + f"until {get}; do s3_errors=$((s3_errors + 1)); i=$((i + 1)); "
        + f'if [ "$i" -gt {polls} ]; then echo "raw $key not readable within {timeout_s:g} s" >&2; exit 1; fi; '
        + f"nap {poll_s:g}; done; "
        + 'extra="$extra, \\"s3_errors\\": $s3_errors"; '
    )


def _ingest_wait(poll_s: float, timeout_s: float, *, fetch: bool = False) -> str:
    polls = max(1, int(math.ceil(timeout_s / poll_s)))
    look = (
        "entry=$(awk -v d={wildcards.detector} '$1 == d {{print $2; exit}}' "
        + EXPECT_DIR
        + '/{wildcards.group:q}.txt 2>/dev/null || true); raw="$PROMPT_SNAKE_ARRIVALS_DIR/$entry"; '
    )
    return (
        _NAP
        + look
        + "i=0; "
        + 'until [ -n "$entry" ] && [ -e "$raw" ]; do i=$((i + 1)); '
        + f'if [ "$i" -gt {polls} ]; then echo "no raw within {timeout_s:g} s: $raw" >&2; exit 1; fi; '
        + f'nap {poll_s:g}; if [ -z "$entry" ]; then {look}fi; done; '
        + 'extra=", \\"seen\\": $EPOCHREALTIME"; '
        + (_fetch_raw(poll_s, timeout_s, polls) if fetch else "")
    )


def _rule(
    stage: str,
    inputs: Mapping[str, str],
    body: str,
    *,
    output: str,
    threads: int | None = None,
    params: Mapping[str, str] | None = None,
) -> str:
    lines = [f"rule {stage}:", "    input:"]
    lines += [f"        {name}={value}," for name, value in inputs.items()]
    lines += ["    output:", f"        {output},"]
    lines += [f"    priority: {PRIORITY[stage]}", "    group:", '        "detector_visit"']
    if threads is not None:
        lines += [f"    threads: {threads}"]
    lines += ["    params:", '        runs=WORK + "/runs.log",']
    lines += [f"        {name}={value}," for name, value in (params or {}).items()]
    shell = _START + body + _END.replace("@STAGE@", stage)
    lines += ["    shell:", f"        {shell!r}", "", ""]
    return "\n".join(lines)


def write_standin_snakefile(
    path: Path,
    cost: CostModel,
    *,
    paths: Mapping[str, str],
    poll_s: float,
    raw_timeout_s: float,
    fetch_raw: bool = False,
    prelude: str = "",
    extra_inputs: Mapping[str, Mapping[str, str]] | None = None,
) -> Path:
    """Write the stand-in Snakefile to ``path`` and return it.

    Parameters
    ----------
    path : `pathlib.Path`
        Where to write it.
    cost : `CostModel`
        Seconds per stage.
    paths : `~collections.abc.Mapping`
        The config's ``paths`` (``visits``, ``work``, ``results``: the shim's target paths).
    poll_s : `float`
        How often ingest looks for its raw (the config's ``ingest.poll_interval_s``).
    raw_timeout_s : `float`
        How long ingest waits for its raw before the target fails.
    fetch_raw : `bool`, optional
        Ingest also reads its raw from the raw bucket through S3 (see the module docstring).
    prelude : `str`, optional
        Snakefile code placed after the header, before the rules (functions for ``extra_inputs``).
    extra_inputs : `~collections.abc.Mapping`, optional
        Per stage, more named inputs (name -> Snakefile expression, e.g. an input function).
    """
    extra = {stage: dict(values) for stage, values in (extra_inputs or {}).items()}
    unknown = set(extra) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"extra_inputs: unknown stage(s) {sorted(unknown)}; expected {STAGE_NAMES}")
    visit = "VISIT_FILE"
    prep, ingest, pipeline = 'WORK + "/prep.json"', 'WORK + "/ingest.json"', 'WORK + "/pipeline.json"'
    export, apdb = 'WORK + "/export.json"', 'WORK + "/apdb.json"'
    spend = {stage: _spend(cost.of(stage), cost.kind) for stage in STAGE_NAMES}
    text = _HEADER.format(visits=paths["visits"], work=paths["work"], results=paths["results"])
    if fetch_raw:
        text += 'RAW_S3 = config["storage"]["endpoint_url"].rstrip("/") + "/" + config["buckets"]["raw"]\n\n'
    text += prelude + ("\n\n" if prelude else "")
    text += _rule("prep", {"visit": visit, **extra.get("prep", {})}, spend["prep"], output=prep)
    text += _rule(
        "ingest",
        {"visit": visit, **extra.get("ingest", {})},
        _ingest_wait(poll_s, raw_timeout_s, fetch=fetch_raw) + spend["ingest"],
        output=ingest,
        params={"raw_s3": "RAW_S3"} if fetch_raw else None,
    )
    text += _rule(
        "pipeline",
        {"visit": visit, "prep": prep, "ingest": ingest, **extra.get("pipeline", {})},
        spend["pipeline"],
        output=pipeline,
        threads=1,
    )
    text += _rule(
        "export",
        {"visit": visit, "ingest": ingest, "pipeline": pipeline, **extra.get("export", {})},
        spend["export"],
        output=export,
    )
    text += _rule(
        "apdb",
        {"visit": visit, "prep": prep, "pipeline": pipeline, **extra.get("apdb", {})},
        spend["apdb"],
        output=apdb,
    )
    text += _rule(
        "finish",
        {"visit": visit, "records": f"[{prep}, {ingest}, {pipeline}, {export}, {apdb}]", **extra.get("finish", {})},
        spend["finish"],
        output='RESULT + "/done.json"',
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
