"""The run directory: resolved config, metrics CSV, TensorBoard, results table and plots.

Layout of ``run_dir``::

    config.json      resolved config (sorted keys); config.yaml too when PyYAML is importable
    metrics.csv      one row per round: "round" then the union of all metric keys ever logged
    tb/              tensorboardX event files: scalars (tags = metric keys), image grids, the config
    results.md       Markdown table: rows = models (method, then baselines), cols "5-way 1-shot", ...
                     (scenario md: the mean over domains, then one such table per domain)
    results.csv      the same results, numeric and long: model, domain (md; else empty), way, shot,
                     tasks, accuracy, ci95
    meta_val.png     meta-val accuracy (metrics column "val/acc") over rounds, when logged
    results.json     written last and atomically: its presence means the run completed

Every file is written through :func:`raydfml.utils.atomic_path`, so none is ever half-written, and
``results.json`` (plus the other results files) of an earlier run are removed when a run starts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import UserError
from .utils import atomic_path

__all__ = ["RunReport", "results_table", "results_long", "format_markdown", "REQUIRED_RESULT_KEYS",
           "models_table", "domain_tables"]

REQUIRED_RESULT_KEYS = ("scenario", "method", "profile", "seed", "wall_s", "meta_test")
METRICS_FILE, RESULTS_FILE = "metrics.csv", "results.json"
_RESULT_FILES = (RESULTS_FILE, "results.md", "results.csv", "meta_val.png")


# ----------------------------------------------------------------------------- JSON helpers
def _jsonable(obj: Any) -> Any:
    """Recursively turn EvalResults, dataclasses, numpy/torch scalars and paths into JSON values."""
    if hasattr(obj, "record") and callable(obj.record):
        return _jsonable(obj.record())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return str(obj)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _scalar(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu()
        return v.item() if v.numel() == 1 else str(v.tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------- results tables
def _records(value: Any) -> list[dict] | None:
    """A list of eval records (dicts or EvalResults), or None when the entry holds none."""
    if value is None or isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        return None
    recs = [_jsonable(r) for r in value]
    recs = [r for r in recs if isinstance(r, Mapping) and {"way", "shot", "accuracy", "ci95"} <= set(r)]
    return recs or None


def _models(results: Mapping) -> list[tuple[str, list[dict] | None]]:
    rows = [(str(results.get("method", "method")), _records(results.get("meta_test")))]
    for name, value in (results.get("baselines") or {}).items():
        rows.append((str(name), _records(value)))
    return rows


def _domain_results(results: Mapping) -> dict[str, dict]:
    """Scenario md: each domain's meta-test (``results["meta_test_domains"]``, ``{domain: {model:
    [records]}}``) shaped like the headline results, in the domains' order; ``{}`` without domains."""
    method = str(results.get("method", "method"))
    out = {}
    for domain, per_model in (results.get("meta_test_domains") or {}).items():
        per_model = dict(per_model or {})
        out[str(domain)] = {"method": method, "meta_test": per_model.pop(method, None), "baselines": per_model}
    return out


def results_long(results: Mapping) -> pd.DataFrame:
    """Numeric long table: one row per (model, domain, way, shot) with tasks, accuracy and ci95
    (percent). ``domain`` is empty for the headline records (scenario md: the mean over domains) and
    names the domain for md's per-domain records, as in a comparison's ``comparison.csv``."""
    rows = []
    for domain, res in {"": results, **_domain_results(results)}.items():
        for model, recs in _models(res):
            for r in recs or []:
                rows.append({"model": model, "domain": domain, "way": int(r["way"]), "shot": int(r["shot"]),
                             "tasks": int(r.get("tasks", 0)), "accuracy": float(r["accuracy"]),
                             "ci95": float(r["ci95"])})
    return pd.DataFrame(rows, columns=["model", "domain", "way", "shot", "tasks", "accuracy", "ci95"])


def results_table(results: Mapping) -> pd.DataFrame:
    """Display table: index "model" (the method first, then each baseline in order), one column per
    setting (``"5-way 1-shot"``, ``"5-way 5-shot"``, sorted by way then shot), cells ``"48.4 ± 1.1"``.
    A model without a result for a setting (or an unavailable baseline) shows ``"n/a"``."""
    return models_table(_models(results))


def models_table(models: list[tuple[str, Any]]) -> pd.DataFrame:
    """:func:`results_table`'s layout for any ``(row name, eval records)`` pairs, in their order."""
    models = [(str(name), _records(recs)) for name, recs in models]
    settings = sorted({(int(r["way"]), int(r["shot"])) for _, recs in models for r in recs or []})
    columns = [f"{w}-way {s}-shot" for w, s in settings]
    data = []
    for _, recs in models:
        cells = {f"{int(r['way'])}-way {int(r['shot'])}-shot": f"{float(r['accuracy']):.1f} ± {float(r['ci95']):.1f}"
                 for r in recs or []}
        data.append([cells.get(c, "n/a") for c in columns])
    df = pd.DataFrame(data, columns=columns, index=pd.Index([m for m, _ in models], name="model"))
    return df


def _have_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def format_markdown(df: pd.DataFrame, index: bool = True) -> str:
    """GitHub Markdown for ``df``: ``DataFrame.to_markdown`` when ``tabulate`` is importable, else a
    small built-in formatter (tabulate is not a dependency)."""
    if _have_tabulate():
        return df.to_markdown(index=index)
    header = ([df.index.name or ""] if index else []) + [str(c) for c in df.columns]
    rows = [([str(i)] if index else []) + [str(v) for v in row] for i, row in zip(df.index, df.itertuples(index=False))]

    def esc(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", " ")

    cols = list(zip(header, *rows)) if rows else [(h,) for h in header]
    widths = [max(3, *(len(esc(c)) for c in col)) for col in cols]
    align = ["left" if (index and j == 0) else "right" for j in range(len(header))]

    def line(cells):
        return "| " + " | ".join(esc(c).ljust(w) if a == "left" else esc(c).rjust(w)
                                 for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join((":" + "-" * (w + 1)) if a == "left" else ("-" * (w + 1) + ":")
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def domain_tables(results: Mapping) -> dict[str, pd.DataFrame]:
    """Scenario md: :func:`results_table` of each domain's own meta-test (``results["meta_test_domains"]``,
    ``{domain: {model: [records]}}``), in the domains' order; ``{}`` when the results have none."""
    return {domain: results_table(res) for domain, res in _domain_results(results).items()}


def _results_markdown(results: Mapping) -> str:
    title = " · ".join(str(results[k]) for k in ("scenario", "method", "profile") if k in results)
    tasks = sorted({int(r.get("tasks", 0)) for _, recs in _models(results) for r in recs or []})
    lines = [f"# {title}" + (f" (seed {results['seed']})" if "seed" in results else ""), "",
             format_markdown(results_table(results)), "",
             "Mean query accuracy (%) ± 95% CI (1.96·std/√n, sample std) over "
             + (", ".join(map(str, tasks)) or "?") + " fixed, seeded meta-test tasks; every model is scored on "
             "the same tasks."]
    tables = domain_tables(results)
    if tables:
        lines[-1] += (" Scenario md: the table is the mean over the " + str(len(tables)) + " domains below "
                      "(accuracy: mean of the domain accuracies; ± sqrt(Σ ci²)/D; tasks per domain).")
        for domain, table in tables.items():
            lines += ["", f"## {domain} (its meta_test split)", "", format_markdown(table)]
        lines.append("")
    lines += _diagnostic_lines(results)
    prov = results.get("provenance")
    if prov:
        lines.append(f"Dataset {', '.join(prov['dataset'])}; teachers {', '.join(prov['backbones']['teachers'])}; "
                     f"meta-model {prov['backbones']['meta_model']} with {prov['learner']}; raydfml {prov['version']}"
                     + (f" at {prov['git_commit'][:12]}" if prov.get("git_commit") else "") + ".")
    if "wall_s" in results:
        lines.append(f"Wall time: {float(results['wall_s']):.1f} s.")
    return "\n".join(lines) + "\n"


def _diagnostic_lines(results: Mapping) -> list[str]:
    """The yardstick (share of the with-data gain recovered) and the pool's class coverage."""
    from .diagnostics import coverage_line, recovered_line

    lines = []
    if results.get("recovered"):
        lines += ["", recovered_line(results["recovered"]) + " (with-data trained for the same meta-updates)."]
    if results.get("coverage"):
        lines += ["", coverage_line(results["coverage"]) + "."]
    return lines + ([""] if lines else [])


# ----------------------------------------------------------------------------- the run directory
# save_gallery's layout in pixels: a title strip, then one cell (caption above image) per image.
GALLERY_CELL = (104, 116)
GALLERY_PAD = 8
GALLERY_TITLE = 20
GALLERY_CAPTION = 30           # two lines of PIL's default font


def gallery_size(per_class: int, n_classes: int) -> tuple[int, int]:
    """(width, height) of a gallery of ``n_classes`` rows of ``per_class`` images."""
    return per_class * GALLERY_CELL[0], GALLERY_TITLE + n_classes * GALLERY_CELL[1]


class RunReport:
    """Writes one run's directory (see the module docstring).

    ``resume=False`` starts fresh: an earlier ``metrics.csv``, results files and TensorBoard event
    files in ``run_dir`` are removed. ``resume=True`` keeps ``metrics.csv`` and the event files;
    call :meth:`truncate` with the round the run resumes after so re-run rounds are not duplicated.
    Either way stale ``results.*`` are removed, since the run is not complete until :meth:`finish`.
    """

    def __init__(self, run_dir: str | os.PathLike, config: Mapping, resume: bool = False):
        from tensorboardX import SummaryWriter

        self._SummaryWriter = SummaryWriter
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tb_dir = self.run_dir / "tb"
        self.metrics_path = self.run_dir / METRICS_FILE
        self.results_path = self.run_dir / RESULTS_FILE
        self.config = _jsonable(dict(config))
        self.resume = resume

        for name in _RESULT_FILES:
            (self.run_dir / name).unlink(missing_ok=True)
        self._rows: dict[int, dict[str, Any]] = {}
        self._columns: list[str] = []
        if resume:
            self._load_metrics()
        else:
            self.metrics_path.unlink(missing_ok=True)
            if self.tb_dir.is_dir():
                for f in self.tb_dir.glob("events.out.tfevents.*"):
                    f.unlink()

        text = json.dumps(self.config, sort_keys=True, indent=2) + "\n"
        _write_text(self.run_dir / "config.json", text)
        try:
            import yaml
        except ImportError:
            yaml = None
        if yaml is not None:
            _write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.config, sort_keys=True))
        self.writer = SummaryWriter(str(self.tb_dir))
        # Indented by four spaces: TensorBoard renders text as Markdown, this keeps it a code block.
        self.writer.add_text("config", "\n".join("    " + ln for ln in text.splitlines()), 0)
        self.writer.flush()

    # -- metrics --------------------------------------------------------------------------------
    def _load_metrics(self) -> None:
        if not self.metrics_path.exists():
            return
        try:
            df = pd.read_csv(self.metrics_path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot resume: {self.metrics_path} is not a readable CSV ({exc})") from exc
        if "round" not in df.columns:
            raise UserError(f"cannot resume: {self.metrics_path} has no 'round' column")
        df = df[df["round"].notna()]
        self._columns = [c for c in df.columns if c != "round"]
        for rec in df.to_dict("records"):
            r = int(rec.pop("round"))
            self._rows[r] = {k: v for k, v in rec.items() if not (isinstance(v, float) and math.isnan(v))}

    def metrics(self) -> pd.DataFrame:
        """The metrics logged so far (as in metrics.csv): column "round" then the metric keys."""
        rows = [{"round": r, **self._rows[r]} for r in sorted(self._rows)]
        return pd.DataFrame(rows, columns=["round", *self._columns])

    @property
    def last_round(self) -> int | None:
        return max(self._rows) if self._rows else None

    def _write_metrics(self) -> None:
        with atomic_path(self.metrics_path) as tmp:
            self.metrics().to_csv(tmp, index=False)

    def log_round(self, round: int, metrics: Mapping[str, Any]) -> None:
        """Record ``metrics`` for ``round``: a metrics.csv row (new keys add columns; logging the same
        round again merges into its row) and TensorBoard scalars tagged with the keys as-is."""
        round = int(round)
        if "round" in metrics:
            raise ValueError("'round' is reserved for the round number; do not log it as a metric")
        row = self._rows.setdefault(round, {})
        for key, value in metrics.items():
            key = str(key)
            value = _scalar(value)
            if key not in self._columns:
                self._columns.append(key)
            row[key] = value
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), round)
        self._write_metrics()
        self.writer.flush()

    def truncate(self, after_round: int) -> None:
        """Drop metrics of rounds ``> after_round`` (from the CSV and, via ``purge_step``, from
        TensorBoard's view), so that a run resumed after ``after_round`` logs no duplicate rows."""
        after_round = int(after_round)
        self._rows = {r: row for r, row in self._rows.items() if r <= after_round}
        self._write_metrics()
        self.writer.close()
        self.writer = self._SummaryWriter(str(self.tb_dir), purge_step=after_round + 1)

    # -- images ---------------------------------------------------------------------------------
    def save_gallery(self, round: int, rec, per_class: int = 6) -> Path | None:
        """``gallery/round<r>_teacher<t>.png``: a teacher's recovered images, one row per class, each
        captioned with the label it was recovered for, the teacher's own label and its confidence
        (red where the teacher disagrees). ``rec`` is a TeacherRecord with images.

        Drawn with PIL rather than matplotlib: a matplotlib figure of subplots cost about a second per
        gallery, several per run, which added up over a test suite of short runs."""
        if rec.images is None or not len(rec.images):
            return None
        from PIL import Image, ImageDraw, ImageFont

        images, labels = np.asarray(rec.images, dtype=np.float32), np.asarray(rec.labels)
        pred = None if rec.predicted is None else np.asarray(rec.predicted)
        conf = None if rec.confidence is None else np.asarray(rec.confidence)
        classes = sorted(set(labels.tolist()))
        width, height = gallery_size(per_class, len(classes))
        canvas = Image.new("RGB", (width, height), "white")
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
        draw.text((4, 4), f"round {round}, teacher {rec.teacher} ({rec.arch})", fill="black", font=font)
        side = min(GALLERY_CELL[0] - 2 * GALLERY_PAD, GALLERY_CELL[1] - GALLERY_CAPTION - GALLERY_PAD)
        for row, c in enumerate(classes):
            for col, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
                x0, y0 = col * GALLERY_CELL[0], GALLERY_TITLE + row * GALLERY_CELL[1]
                text = f"class {rec.classes[c]}"
                if pred is not None:
                    text += f"\nteacher {rec.classes[int(pred[i])]}" + ("" if conf is None else f" {conf[i]:.2f}")
                colour = "black" if pred is None or pred[i] == c else "red"
                draw.multiline_text((x0 + GALLERY_PAD, y0 + 2), text, fill=colour, font=font, spacing=2)
                pixels = (np.clip(images[i].transpose(1, 2, 0), 0, 1) * 255).round().astype(np.uint8)
                tile = Image.fromarray(pixels).resize((side, side), Image.NEAREST)
                canvas.paste(tile, (x0 + GALLERY_PAD, y0 + GALLERY_CELL[1] - side - GALLERY_PAD))
        path = self.run_dir / "gallery" / f"round{int(round):04d}_teacher{rec.teacher}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            canvas.save(tmp, format="PNG")
        return path

    def log_images(self, round: int, tag: str, images: torch.Tensor, nrow: int = 10,
                   save_png: bool = False) -> None:
        """A grid of ``images`` (``[n, 3, S, S]`` in [0, 1]) as TensorBoard image ``tag`` at ``round``;
        with ``save_png`` also ``images/<tag>_r<round>.png`` in the run directory."""
        from torchvision.utils import make_grid

        x = images.detach().float().cpu().clamp(0.0, 1.0)
        if x.dim() != 4:
            raise ValueError(f"log_images expects [n, C, S, S] images, got shape {tuple(x.shape)}")
        grid = make_grid(x, nrow=nrow, padding=2, pad_value=1.0)
        self.writer.add_image(tag, grid, int(round), dataformats="CHW")
        self.writer.flush()
        if save_png:
            from PIL import Image

            path = self.run_dir / "images" / f"{tag.replace('/', '_')}_r{int(round)}.png"
            arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            with atomic_path(path) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")

    # -- results --------------------------------------------------------------------------------
    def plot_meta_val(self) -> Path | None:
        """``meta_val.png``: column ``val/acc`` of metrics over rounds (band from ``val/ci95`` when
        logged). Returns the path, or None when no meta-val accuracy was logged."""
        df = self.metrics()
        if "val/acc" not in df.columns:
            return None
        df = df[["round", *[c for c in ("val/acc", "val/ci95") if c in df.columns]]]
        df = df.apply(pd.to_numeric, errors="coerce").dropna(subset=["val/acc"])
        if df.empty:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        x, y = df["round"].to_numpy(), df["val/acc"].to_numpy()
        ax.plot(x, y, marker="o", markersize=3, label="meta-val accuracy")
        if "val/ci95" in df.columns and df["val/ci95"].notna().any():
            ci = df["val/ci95"].fillna(0.0).to_numpy()
            ax.fill_between(x, y - ci, y + ci, alpha=0.25, label="95% CI")
        best = int(np.argmax(y))
        ax.scatter([x[best]], [y[best]], color="tab:red", zorder=3, label=f"best {y[best]:.1f} (round {int(x[best])})")
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(str(self.config.get("method", "")) + " meta-val")
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
        fig.tight_layout()
        path = self.run_dir / "meta_val.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        return path

    def finish(self, results: Mapping) -> None:
        """Write results.md, results.csv, meta_val.png, then results.json (last, atomically) and close.

        ``results`` must hold ``scenario, method, profile, seed, wall_s, meta_test`` (a list of eval
        records or EvalResults) and may hold ``baselines: {name: [records] | None}`` and anything else.
        """
        missing = [k for k in REQUIRED_RESULT_KEYS if k not in results]
        if missing:
            raise ValueError(f"results lack required keys: {', '.join(missing)}")
        results = _jsonable(dict(results))
        results.setdefault("baselines", {})
        # results.md/.csv are written under hidden names and take their names only after results.json:
        # no results table ever sits in a run directory that has no results.json.
        staged = {self.run_dir / "results.md": self.run_dir / ".results.md.staged",
                  self.run_dir / "results.csv": self.run_dir / ".results.csv.staged"}
        _write_text(staged[self.run_dir / "results.md"], _results_markdown(results))
        with atomic_path(staged[self.run_dir / "results.csv"]) as tmp:
            results_long(results).to_csv(tmp, index=False)
        self.plot_meta_val()
        if self.writer is not None:
            self.writer.add_text("results", format_markdown(results_table(results)), self.last_round or 0)
        _write_text(self.results_path, json.dumps(results, indent=2, sort_keys=False, allow_nan=False) + "\n")
        for final, tmp in staged.items():
            os.replace(tmp, final)
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RunReport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
