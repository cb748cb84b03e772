"""Kill a run at each fault-injection point, resume it, and compare with an uninterrupted run.

    python benchmarks/fault_matrix.py [--methods deepinv,geninv,purer,free,tgr] [--points all]
        [--data-root data] [--out runs/fault_matrix] [--round 1] [--workers 0]

For each method (smoke profile, scenario mr, in-process): one uninterrupted run; then, per point of
``raydfml.faults.POINTS``, a run with ``RAYDFML_FAULT=<point>@<round>`` (the process SIGKILLs itself
there), then ``--resume`` in the same directory. A cell reads ``survived`` when the killed run died
where it should (status -9) and the resumed one finished, with the rounds it redid ("lost rounds": the
rounds after the checkpoint it resumed from) and whether its meta-test and baselines equal the
uninterrupted run's exactly. Writes ``<out>/fault_matrix.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def launch(method: str, data_root: Path, out: Path, resume: bool = False, fault: str | None = None,
           workers: int = 0, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAYDFML_FAULT", None)
    if fault:
        env["RAYDFML_FAULT"] = fault
    cmd = [sys.executable, str(REPO / "launch.py"), "--scenario", "mr", "--method", method, "--profile", "smoke",
           "--workers", str(workers), "--quiet", "--data-root", str(data_root), "--out", str(out)]
    return subprocess.run(cmd + list(extra) + (["--resume"] if resume else []), env=env, capture_output=True, text=True,
                          timeout=900)


def kill_and_resume(method: str, point: str, data_root: Path, out: Path, reference: dict, round_idx: int = 1,
                    workers: int = 0, extra: tuple[str, ...] = ()) -> dict:
    """One cell of the matrix (see the module docstring); ``extra``: more launch.py arguments."""
    shutil.rmtree(out, ignore_errors=True)
    killed = launch(method, data_root, out, fault=f"{point}@{round_idx}", workers=workers, extra=extra)
    rounds_logged = 0
    if (out / "metrics.csv").is_file():
        rounds_logged = max(0, len((out / "metrics.csv").read_text().strip().splitlines()) - 1)
    resumed = launch(method, data_root, out, resume=True, workers=workers, extra=extra)
    cell = {"method": method, "point": point, "killed_status": killed.returncode, "resume_status": resumed.returncode,
            "survived": killed.returncode == -9 and resumed.returncode == 0}
    resumed_at = next((ln for ln in resumed.stdout.splitlines() if ln.startswith("resuming from the checkpoint")), "")
    start = int(resumed_at.rsplit("round", 1)[-1]) if resumed_at else 0
    cell["lost_rounds"] = max(0, rounds_logged - start) if point != "mid_meta_test" else 0
    if cell["survived"]:
        res = json.loads((out / "results.json").read_text())
        differs = [k for k in ("meta_test", "baselines", "weights") if res.get(k) != reference.get(k)]
        cell["results_equal"] = not differs
        if differs:       # what differs, so that a failure says where to look
            cell["differs"] = {k: {"uninterrupted": reference.get(k), "resumed": res.get(k)} for k in differs}
            cell["resume_stdout"] = resumed.stdout[-500:]
    else:
        cell["results_equal"] = False
        cell["stderr"] = (killed.stderr + resumed.stderr)[-500:]
    return cell


def main() -> None:
    from raydfml.faults import POINTS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="deepinv,geninv,purer,free,tgr")
    p.add_argument("--points", default="all")
    p.add_argument("--data-root", default="data")
    p.add_argument("--out", default="runs/fault_matrix")
    p.add_argument("--round", type=int, default=1)
    p.add_argument("--workers", type=int, default=0, help="TeacherPool actors on Ray (0: in-process)")
    args = p.parse_args()
    out, root = Path(args.out).resolve(), Path(args.data_root).resolve()
    points = POINTS if args.points == "all" else tuple(args.points.split(","))
    cells = []
    for method in args.methods.split(","):
        ref_dir = out / method / "uninterrupted"
        shutil.rmtree(ref_dir, ignore_errors=True)
        ref = launch(method, root, ref_dir, workers=args.workers)
        if ref.returncode != 0:
            sys.exit(f"{method}: the uninterrupted run failed:\n{ref.stderr[-2000:]}")
        reference = json.loads((ref_dir / "results.json").read_text())
        for point in points:
            cell = kill_and_resume(method, point, root, out / method / point, reference, args.round, args.workers)
            cells.append(cell)
            print(f"{method:8s} {point:16s} survived={cell['survived']} lost_rounds={cell['lost_rounds']} "
                  f"results_equal={cell['results_equal']}", flush=True)
    lines = ["| method | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
    for method in args.methods.split(","):
        row = [c for c in cells if c["method"] == method]
        lines.append(f"| {method} | " + " | ".join(
            ("survived" if c["survived"] else "LOST") + f", {c['lost_rounds']} lost, "
            + ("equal" if c["results_equal"] else "DIFFERENT") for c in row) + " |")
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# Fault injection: kill at each point (round {args.round}), resume, compare\n\n" + "\n".join(lines)
            + "\n\nCell: the killed run died there and the resume finished; rounds redone after resuming; "
              "meta-test and baselines equal to an uninterrupted run of the same seed.\n")
    (out / "fault_matrix.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
