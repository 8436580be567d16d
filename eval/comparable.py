"""When two runs of the harness may be compared: the settings a results file and a baseline must
share, where a sweep records the server's part of them, and the sentence naming a difference.

A run's settings: its ``tasks``, ``limit`` (documents per task) and ``target`` (the sweep's),
``model`` (compared by the checkpoint folder's name: CI machines keep it under other paths),
``rule`` and ``q`` (the server's rule and its L_q exponent), and what the server reported running
(``GET /v1/sparsity``'s ``serving``, ``versions.serving``): ``dtype``, ``device`` and the vLLM and
plugin versions. A sweep writes the latter to ``<out>/serving.json`` when it first talks to the
server, refuses to resume a folder whose points another server scored, and ``report.build`` copies
it into ``results.json`` (``serving``); ``check.make_baseline`` keeps it in the baseline.

A field one side does not record (a file from before it was recorded, or a server whose plugin
predates ``serving``) is not compared: ``differences`` lists it apart, and ``check`` warns.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_sparsity.eval.errors import NotComparable

SERVING = ("model", "dtype", "device", "vllm", "vllm_sparsity")
# field -> its name in messages, in the order they are reported
LABELS = {"tasks": "tasks", "limit": "limit", "target": "target", "model": "model",
          "rule": "rule", "q": "q", "dtype": "dtype", "device": "device",
          "vllm": "vLLM version", "vllm_sparsity": "plugin version"}
_MISSING = object()


def settings(data: dict) -> dict:
    """The comparable settings of a results.json or baseline dict (``LABELS``' fields); a field it
    does not record is left out."""
    out = {k: data[k] for k in ("tasks", "limit", "target", "rule", "q") if k in data}
    if data.get("model"):
        out["model"] = Path(str(data["model"]).rstrip("/")).name
    serving = data.get("serving") or {}
    out |= {k: serving[k] for k in SERVING[1:] if serving.get(k) is not None}
    return out


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "unset" if value is None else str(value)


def differences(results: dict, baseline: dict) -> tuple[list[str], dict[str, list[str]]]:
    """(differences, unrecorded): one phrase per field whose values differ ("dtype is float32 in
    the results and bfloat16 in the baseline"), and per side ("results", "baseline") the labels
    of the fields it does not record while the other side does or both do not."""
    r, b = settings(results), settings(baseline)
    diffs = [f"{label} is {_show(r[k])} in the results and {_show(b[k])} in the baseline"
             for k, label in LABELS.items() if k in r and k in b and r[k] != b[k]]
    unrecorded = {side: [label for k, label in LABELS.items() if k not in have]
                  for side, have in (("results", r), ("baseline", b))}
    return diffs, {side: labels for side, labels in unrecorded.items() if labels}


def serving_of(state: dict) -> dict:
    """The ``serving`` part of a ``GET /v1/sparsity`` answer, every field of ``SERVING`` present
    (None where the server's plugin does not report it)."""
    serving = state.get("serving") or {}
    return {k: serving.get(k) for k in SERVING}


def record_serving(out: Path, state: dict) -> dict:
    """Write ``<out>/serving.json`` from a server's ``GET /v1/sparsity`` answer; returns it.

    Raises:
        NotComparable: ``out`` already holds points scored by a server running another model
            (by folder name), dtype, device, vLLM or plugin version (fields both record).
    """
    now, path = serving_of(state), out / "serving.json"
    if path.exists():
        before = json.loads(path.read_text())
        diffs, _ = differences({"model": before.get("model"), "serving": before},
                               {"model": now["model"], "serving": now})
        if diffs:
            raise NotComparable(
                f"--out {out} holds points scored by another server ("
                + "; ".join(d.replace("in the results", "there").replace(
                    "in the baseline", "on this server") for d in diffs)
                + "); use another --out, or delete it")
    path.write_text(json.dumps(now, indent=1) + "\n")
    return now


def refuse(results: dict, baseline: dict, what: str) -> list[str]:
    """Raise NotComparable naming every difference (``what``: the two files, for the message);
    else return one warning line per side about the fields it does not record (not compared)."""
    diffs, unrecorded = differences(results, baseline)
    if diffs:
        raise NotComparable(f"{what} are not comparable: " + "; ".join(diffs)
                            + "; check against a baseline built from a sweep with the same "
                            "settings on the same software (eval/README.md, CI job)")
    why = {"baseline": "made before they were recorded): not compared; rebuild it to have them "
                       "checked",
           "results": "a sweep from before they were recorded, or a server whose plugin does "
                      "not report them): not compared"}
    return [f"the {side} do{'es' if side == 'baseline' else ''} not record {', '.join(labels)} "
            f"({why[side]}" for side, labels in unrecorded.items()]
