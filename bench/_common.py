"""Shared by the bench scripts: environment metadata recorded with every result."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess


def cpu_model() -> str:
    """The CPU's model name and the ISA flags that matter to the kernels (Linux; else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    return f"{name} [{' '.join(f for f in wanted if f in flags)}]"


def environment() -> dict:
    import torch
    import transformers

    import qruntime

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "qruntime": qruntime.__version__,
        "cpu_backend": qruntime.cpu_backend(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_json(path: str | None, payload: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def _points(diff: float, se: float) -> str:
    return f"{100 * diff:+.1f}+-{100 * se:.1f}p"


TASK_HEADER = (f"{'sentiment':>9} {'vs original':>12} {'refit vs':>12} {'topic cv':>9} {'vs original':>12} "
               f"{'refit vs':>12} {'Lee r':>7} {'vs original':>15}")


def _probe_columns(p: dict) -> str:
    return (f"{p['model']:>9.3f} {_points(p['model'] - p['reference'], p['model_se']):>12} "
            f"{_points(p['model_refit'] - p['reference'], p['refit_se']):>12}")


def task_columns(t: dict) -> str:
    """An ``EncoderTasksEval.to_dict()`` as table columns: the sentiment probe (4,000 sentences) and the
    topic probe (cross-validated, the original's probes on the model's embeddings, and refit), with their
    paired differences in points, and the Lee similarity Pearson correlation with its difference to the
    original's (jackknife standard error)."""
    lee = t["lee"]
    lee_diff = f"{lee['model_pearson'] - lee['reference_pearson']:+.3f}+-{lee['pearson_se']:.3f}"
    return (f"{_probe_columns(t['sentiment'])} {_probe_columns(t['newsgroups'])} "
            f"{lee['model_pearson']:>7.3f} {lee_diff:>15}")


def teacher_tasks(t: dict) -> str:
    """The original's own scores in an ``EncoderTasksEval.to_dict()``, as one line."""
    lee = t["lee"]
    return (f"sentiment probe on {t['sentiment']['sentences']} sentences (cross-validated) "
            f"{t['sentiment']['reference']:.3f}, topic probe {t['newsgroups']['reference']:.3f}, Lee similarity "
            f"Pearson {lee['reference_pearson']:.3f} (Spearman {lee['reference_spearman']:.3f})")


def cv_probe_difference(e: dict) -> str:
    """An ``EncoderEval.to_dict()``'s cross-validated difference of the reference's probes on the model,
    in points, with its standard error: ``-1.8+-1.8p``."""
    return _points(e['probe_cv_model'] - e['probe_cv_reference'], e['probe_cv_model_se'])
