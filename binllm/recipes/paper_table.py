"""The paper's table on one data set: MF, BinMF, TO, IO, IT and two-step BinLLM, each LLM method with
binary and with dotted codes; AUC / UAUC overall, warm and cold; validation curves and score plots.

Methods (BinLLM paper, Table 2):
- MF: the continuous MF baseline (encoder.mf_dim); BinMF: <h_u, h_i> of the binary encoder.
- TO: LoRA on text-only prompts (TALLRec), tune.stage1 settings. It is also stage 1 of BinLLM.
- IO: LoRA on codes-only prompts; IT: LoRA on full prompts from fresh LoRA (tune.stage2 settings).
- BinLLM: TO's best adapter, tuned further on full prompts (tune.stage2 settings): two-step tuning.

Every method writes its test scores and training history under <run dir>/paper/methods/ when it
finishes, and a rerun of the same run skips the methods already there: the encoders can run on a CPU
and the LLM methods on a GPU, and an interrupted run loses one method at most (one whose tuning finished
keeps its adapter and <method>.tuned.json, and a rerun only scores it). Report: <run dir>/paper/
metrics.md, metrics.json, test_scores.parquet, auc_bars.png, valid_auc.png, score_dist.png; the report has AUC
differences of the pairs the paper orders with paired-bootstrap 95% intervals (`pairs` in metrics.json).
Every LLM method's adapter is kept (<run dir>/paper/adapters/<method>.safetensors).

Beyond the paper, as rows of their own: with paper.blend_valid_rows > 0, each code method in paper.blend also
scores that many seeded validation rows, and the table gets a "<method>+BinMF" row: a logistic regression on
BinMF's and the method's logits fitted on those rows (binllm.blend), applied to the test rows, with the
intervals of its differences from BinMF and from the method alone. The method's own row is unchanged.
When stage 2 distils the code_bits teacher (tune.stage2.distill > 0, distill_teacher: code_bits), the table also
gets the teacher's row, "CodeBits": what the code methods were taught, scored on the same test rows, with the
intervals of each code method against it and of it against BinMF, and its validation AUC drawn across
valid_auc.png beside BinMF's.
The MLflow run `<run.name>-paper_table` (binllm.tracking) holds the config, each method's validation curves
(<method>/<stage>/valid_auc per step), its test metrics (test/<method>/<metric>), the report and the plots.

    binllm paper_table --config cluster/presets/paper_ml1m.yaml --config cluster/presets/paper_ml1m_cpu.yaml
    binllm paper_table --config cluster/presets/paper_ml1m.yaml --config cluster/presets/paper_ml1m_gpu.yaml
"""
from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from binllm import sources, storage, tracking
from binllm.blend import fit_blend
from binllm.config import CODE_METHODS, PAPER_METHODS, Config, PromptConfig, TuneConfig
from binllm.data import split_rows
from binllm.encoder import export_codes, load_encoder, rows_auc, score_pairs, train_encoder
from binllm.evaluation import llm_logits
from binllm.llm.lora import apply_lora
from binllm.metrics import (N_BOOT, PAPER_PAIRS, auc, evaluate_scores, format_pairs, format_report, match_pairs,
                            pairwise_report, report_table)
from binllm.paper_rows import (BLEND_PARTNER, TEACHER, TEACHER_PAIRS, MethodResult, MethodSpec, PaperTable, blend_pairs,
                               blend_spec)
from binllm.plots import plot_auc_bars, plot_score_distributions, plot_validation_curves
from binllm.run_steps import prepare_run, publish_encoder
from binllm.train.state import copy_into_parameters
from binllm.tune import stage_rows, tune_lora
from binllm.tune.code_targets import code_logits, teacher_fit_rows

log = logging.getLogger(__name__)

SECTIONS = ("run", "storage", "data", "encoder", "prompt", "llm", "tune", "score", "paper", "tracking")
PAPER_DIR = "paper"
METHODS = PAPER_METHODS
PAPER_ML1M = {  # AUC, UAUC on ML-1M (Zhang et al. 2024, Table 2)
    "MF": (0.6482, 0.6361), "BinMF": (0.7189, 0.6654), "TO": (0.7097, 0.6818), "IO": (0.7307, 0.6797),
    "IT": (0.7286, 0.6842), "BinLLM": (0.7425, 0.6956),
}


@dataclass
class TunedMethod:
    """An LLM method's tuned model, its stages (StageResult dicts) and answer tokens; earlier_seconds: the tuning
    time of an earlier invocation whose adapter this one scores."""
    model: torch.nn.Module
    stages: list[dict]
    answer: dict
    earlier_seconds: float = 0.0


def paper_uri(cfg: Config, *parts: str) -> str:
    return storage.join_uri(cfg.run_dir(), PAPER_DIR, *parts)


def method_specs(methods: list[str], code_formats: list[str]) -> list[MethodSpec]:
    """The configured methods (checked by the config) in table order (BinLLM brings its stage 1, TO, along)."""
    wanted = set(methods) | ({"TO"} if "BinLLM" in methods else set())
    specs = []
    for method in METHODS:
        if method in wanted:
            formats = code_formats if method in CODE_METHODS else [None]
            specs.extend(MethodSpec(method, fmt) for fmt in formats)
    return specs


def run_order(specs: list[MethodSpec]) -> list[MethodSpec]:
    """Encoders, TO, then per code format BinLLM, IT, IO: when a time budget cuts the run short, the
    headline comparison (BinLLM against TO, IT and IO with the first format) is complete first."""
    rank = {"MF": 0, "BinMF": 1, "TO": 2, "BinLLM": 3, "IT": 4, "IO": 5}
    formats = list(dict.fromkeys(s.code_format for s in specs if s.code_format))
    return sorted(specs, key=lambda s: (s.code_format is not None, formats.index(s.code_format) if s.code_format
                                        else 0, rank[s.method]))


def _saved(cfg: Config, spec: MethodSpec, n_rows: int) -> MethodResult | None:
    meta_uri = paper_uri(cfg, "methods", f"{spec.slug}.json")
    if not storage.exists(meta_uri, cfg.storage):
        return None
    meta = storage.read_json(meta_uri, cfg.storage)
    scores = storage.read_table(paper_uri(cfg, "methods", f"{spec.slug}.parquet"), cfg.storage, what="method scores")
    logits = scores.column("logit").to_numpy(zero_copy_only=False).astype(np.float32)
    if len(logits) != n_rows:
        raise ValueError(f"{meta_uri}: scores for {len(logits)} test rows, this run's test sample has {n_rows}; "
                         "remove the paper/ folder or use another run.name")
    valid_uri = paper_uri(cfg, "methods", f"{spec.slug}.valid.parquet")
    valid = None
    if storage.exists(valid_uri, cfg.storage):
        valid = storage.read_table(valid_uri, cfg.storage, what="method validation scores")
        valid = valid.column("logit").to_numpy(zero_copy_only=False).astype(np.float32)
    return MethodResult(spec, logits, meta["seconds"], meta["stages"], meta["notes"], valid)


def _save(cfg: Config, result: MethodResult) -> None:
    slug = result.spec.slug
    storage.write_table(pa.table({"logit": pa.array(result.logits, pa.float32())}),
                        paper_uri(cfg, "methods", f"{slug}.parquet"), cfg.storage)
    if result.valid_logits is not None:
        storage.write_table(pa.table({"logit": pa.array(result.valid_logits, pa.float32())}),
                            paper_uri(cfg, "methods", f"{slug}.valid.parquet"), cfg.storage)
    storage.write_json({"method": result.spec.name, "seconds": result.seconds, "stages": result.stages,
                        "notes": result.notes}, paper_uri(cfg, "methods", f"{slug}.json"), cfg.storage)


class PaperRun:
    """The state shared by the methods of one table: data, test rows, encoders, the base LLM's location."""

    def __init__(self, cfg: Config, device: str):
        self.cfg, self.device = cfg, device
        self.examples, self.items = self._examples()
        self.test = split_rows(self.examples, "test", cfg.paper.max_test_rows, cfg.run.seed)
        if self.test.num_rows == 0:
            raise ValueError("examples: split 'test' has no rows")
        self.blend_rows = None  # the seeded validation rows of the blend rows (paper.blend_valid_rows)
        if cfg.paper.blend_valid_rows:
            self.blend_rows = split_rows(self.examples, "valid", cfg.paper.blend_valid_rows, cfg.run.seed + 2)
            if self.blend_rows.num_rows == 0:
                raise ValueError("examples: split 'valid' has no rows to fit the blend rows on "
                                 "(paper.blend_valid_rows)")
        self.finished: dict[MethodSpec, MethodResult] = {}  # filled by `run`, in run_order
        self._binmf = None
        self._codes: tuple[pa.Table, pa.Table] | None = None
        self._to_adapter: dict[str, torch.Tensor] | None = None

    def _examples(self) -> tuple[pa.Table, pa.Table]:
        layout = self.cfg.layout()
        if storage.exists(storage.join_uri(layout.examples, "examples.parquet"), layout.storage):
            return sources.read_examples(layout)
        return prepare_run(self.cfg.data, layout)

    # --- encoders ----------------------------------------------------------------------------------
    def binmf(self):
        if self._binmf is None:
            layout = self.cfg.layout()
            if storage.exists(storage.join_uri(layout.encoder, "encoder.json"), layout.storage):
                fs, path = storage.filesystem_for(layout.encoder, layout.storage)
                self._binmf = load_encoder(path, filesystem=fs)
            else:
                self._binmf = train_encoder(self.examples, self.cfg.encoder, kind="binary", seed=self.cfg.run.seed)
                publish_encoder(layout, self._binmf)
        return self._binmf

    def codes(self) -> tuple[pa.Table, pa.Table]:
        if self._codes is None:
            self._codes = export_codes(self.binmf())
        return self._codes

    # --- methods -----------------------------------------------------------------------------------
    def run(self, spec: MethodSpec) -> MethodResult:
        started = time.perf_counter()
        if spec.method in ("MF", "BinMF"):
            return self._encoder_method(spec, started)
        return self._llm_method(spec, started)

    def _encoder_method(self, spec: MethodSpec, started: float) -> MethodResult:
        if spec.method == "MF":
            encoder = train_encoder(self.examples, self.cfg.encoder, kind="mf", seed=self.cfg.run.seed)
        else:
            encoder = self.binmf()
        logits = score_pairs(encoder, self.test.column("user_id"), self.test.column("item_id"))
        history = [{"name": "encoder", "prompt_kind": "", "history": encoder.history, "best_auc": encoder.best_auc,
                    "steps": encoder.steps, "epochs": encoder.epochs}]
        return MethodResult(spec, np.asarray(logits, np.float32), time.perf_counter() - started, history,
                            {"embedding_rows": [len(encoder.user_ids), len(encoder.item_ids)]})

    def binmf_valid_auc(self) -> float:
        """BinMF's AUC on the rows the code methods validate on (tune_lora's seeded stage-2 sample): the bar
        their validation curves must pass."""
        _, rows = stage_rows(self.examples, self.cfg.tune.stage2, self.cfg.run.seed)
        return rows_auc(self.binmf(), rows)

    def distils_code_bits(self) -> bool:
        """Whether stage 2 (IO, IT, BinLLM) trains toward the code_bits teacher."""
        stage = self.cfg.tune.stage2
        return stage.distill_teacher == "code_bits" and max(stage.distill_weights) > 0

    def teacher_logits(self, rows: pa.Table) -> np.ndarray | None:
        """The code_bits teacher's logits on `rows`, fitted as tune_lora fits it (every train row of the examples);
        0 where a row lacks a code; None when the train rows cannot fit it (tune_lora then trains on labels)."""
        user_codes, item_codes = self.codes()
        logits = code_logits(rows, None, user_codes, item_codes, TEACHER, "code_bits",
                             teacher_fit_rows(self.examples, "code_bits", self.cfg.run.seed))
        return None if logits is None else np.nan_to_num(logits, nan=0.0).astype(np.float32)

    def teacher_valid_auc(self) -> float:
        """The code_bits teacher's AUC on the stage-2 validation rows (the rows of `binmf_valid_auc`)."""
        _, rows = stage_rows(self.examples, self.cfg.tune.stage2, self.cfg.run.seed)
        return auc(rows.column("label").to_numpy(zero_copy_only=False), self.teacher_logits(rows))

    def method_sections(self, spec: MethodSpec) -> tuple[PromptConfig, TuneConfig]:
        """The prompt and tune sections of an LLM method: one intuitive stage on its prompts (TO: text-only
        prompts with stage 1's settings)."""
        prompt, tune = self.cfg.prompt, self.cfg.tune
        if spec.method == "TO":
            return (dataclasses.replace(prompt, kind="text"),
                    dataclasses.replace(tune, mode="intuitive", stage2=tune.stage1))
        kind = "codes" if spec.method == "IO" else "full"
        return (dataclasses.replace(prompt, kind=kind, code_format=spec.code_format),
                dataclasses.replace(tune, mode="intuitive"))

    def _llm_method(self, spec: MethodSpec, started: float) -> MethodResult:
        cfg = self.cfg
        prompt, tune = self.method_sections(spec)
        user_codes, item_codes = self.codes() if spec.method != "TO" else (None, None)
        model, tokenizer = sources.load_base_model(cfg.llm, cfg.storage, device=self.device)
        tuned = self._tuned_earlier(spec, tune, model)
        if tuned is None:
            tuned = self._tune(spec, prompt, tune, (user_codes, item_codes), model, tokenizer, started)
        logits, fallbacks = llm_logits(self.test, self.items, user_codes, item_codes, prompt=prompt, llm=cfg.llm,
                                       score=cfg.score, model=tuned.model, tokenizer=tokenizer)
        valid_logits = None
        if self.blends(spec):
            valid_logits, _ = llm_logits(self.blend_rows, self.items, user_codes, item_codes, prompt=prompt,
                                         llm=cfg.llm, score=cfg.score, model=tuned.model, tokenizer=tokenizer)
        notes = {"text_only_fallbacks": fallbacks, "answer": tuned.answer}
        del model, tuned.model
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return MethodResult(spec, logits, tuned.earlier_seconds + time.perf_counter() - started, tuned.stages, notes,
                            valid_logits)

    def _tune(self, spec: MethodSpec, prompt: PromptConfig, tune: TuneConfig, codes: tuple, model: torch.nn.Module,
              tokenizer, started: float) -> TunedMethod:
        """Tunes `spec`'s adapter, keeps it (paper/adapters/) and then records that it is tuned
        (paper/methods/<slug>.tuned.json): a rerun interrupted while scoring scores this adapter again."""
        initial, stages = None, []
        if spec.method == "BinLLM":
            initial = self.to_adapter()
            stages = self.finished[MethodSpec("TO")].stages
        tuned = tune_lora(self.examples, self.items, *codes, tune=tune, prompt=prompt, llm=self.cfg.llm,
                          seed=self.cfg.run.seed, model=model, tokenizer=tokenizer, initial_adapter=initial)
        self._save_adapter(spec, tuned.adapter_state)
        new = [dataclasses.asdict(s) for s in tuned.stages]
        if spec.method == "TO":
            new = [{**s, "name": "stage1"} for s in new]  # TO is BinLLM's stage 1
        record = {"stages": stages + new, "answer": dataclasses.asdict(tuned.answer),
                  "seconds": time.perf_counter() - started}
        storage.write_json(record, paper_uri(self.cfg, "methods", f"{spec.slug}.tuned.json"), self.cfg.storage)
        return TunedMethod(tuned.model, record["stages"], record["answer"])

    def _tuned_earlier(self, spec: MethodSpec, tune: TuneConfig, model: torch.nn.Module) -> TunedMethod | None:
        """The adapter an earlier invocation tuned for `spec` and kept, but did not finish scoring with, attached
        to `model` (None without both its record and the adapter)."""
        record_uri = paper_uri(self.cfg, "methods", f"{spec.slug}.tuned.json")
        adapter_uri = paper_uri(self.cfg, "adapters", f"{spec.slug}.safetensors")
        if not (storage.exists(record_uri, self.cfg.storage) and storage.exists(adapter_uri, self.cfg.storage)):
            return None
        record = storage.read_json(record_uri, self.cfg.storage)
        state = self._read_adapter(adapter_uri)
        if spec.method == "TO":
            self._to_adapter = state
        lora = tune.lora
        peft_model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                target_modules=lora.target_modules, top_layers=lora.top_layers)
        copy_into_parameters(peft_model, state)
        log.info("method %s: tuned by an earlier invocation (%.0f s); scoring its kept adapter %s "
                 "(remove paper/methods/%s.tuned.json to tune it again)", spec.name, record["seconds"], adapter_uri,
                 spec.slug)
        return TunedMethod(peft_model, record["stages"], record["answer"], record["seconds"])

    def blends(self, spec: MethodSpec) -> bool:
        """Whether `spec` gets a "<method>+BinMF" row (and so scores the blend validation rows)."""
        return bool(self.cfg.paper.blend_valid_rows) and spec.method in self.cfg.paper.blend

    def can_blend(self, result: MethodResult) -> bool:
        """Whether `result` holds scores of this run's blend validation rows (a method finished by an earlier
        invocation with another paper.blend_valid_rows, or none, does not)."""
        return result.valid_logits is not None and len(result.valid_logits) == self.blend_rows.num_rows

    def blend_row(self, result: MethodResult) -> MethodResult:
        """The "<method>+BinMF" row of a finished code method (`can_blend`): a logistic regression on BinMF's and
        the method's logits, fitted on the blend validation rows and applied to the test rows."""
        started = time.perf_counter()
        spec = result.spec
        binmf = self.binmf()

        def features(rows: pa.Table, logits: np.ndarray) -> np.ndarray:
            partner = score_pairs(binmf, rows.column("user_id"), rows.column("item_id"))
            return np.column_stack([np.asarray(partner, np.float64), logits.astype(np.float64)])

        labels = self.blend_rows.column("label").to_numpy(zero_copy_only=False)
        blend = fit_blend(features(self.blend_rows, result.valid_logits), labels, names=(BLEND_PARTNER, spec.method))
        logits = blend.logits(features(self.test, result.logits))
        notes = {"blend": blend.to_dict(), "valid_rows": self.blend_rows.num_rows}
        return MethodResult(blend_spec(spec), logits, time.perf_counter() - started, [], notes)

    def _save_adapter(self, spec: MethodSpec, state: dict[str, torch.Tensor]) -> None:
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        if spec.method == "TO":
            self._to_adapter = state
        storage.write_bytes(save_safetensors(state), paper_uri(self.cfg, "adapters", f"{spec.slug}.safetensors"),
                            self.cfg.storage)

    def to_adapter(self) -> dict[str, torch.Tensor]:
        if self._to_adapter is None:
            uri = paper_uri(self.cfg, "adapters", "TO.safetensors")
            if not storage.exists(uri, self.cfg.storage):
                raise ValueError("BinLLM (two-step) continues the TO adapter: run method TO first "
                                 "(config key 'paper.methods' must list TO before BinLLM)")
            self._to_adapter = self._read_adapter(uri)
        return self._to_adapter

    def _read_adapter(self, uri: str) -> dict[str, torch.Tensor]:
        fs, path = storage.filesystem_for(uri, self.cfg.storage)
        with fs.open_input_stream(path) as f:
            return load_safetensors(f.read())


def run_paper_table(cfg: Config, device: str | None = None) -> PaperTable:
    """Runs (or resumes) every configured method, then writes the report (see `write_report`); one MLflow run."""
    with tracking.job_run(cfg.tracking, cfg.run.output_root, run_name=cfg.run.name, job="paper_table",
                          params=cfg.to_dict()) as tracked:
        table = _run_methods(cfg, PaperRun(cfg, device or ("cuda" if torch.cuda.is_available() else "cpu")))
        write_report(cfg, table)
        record_table(tracked, cfg, table)
    print(table.text)
    print(f"\nreport: {paper_uri(cfg, 'metrics.md')} ({table.seconds:.0f} s)")
    return table


def main(cfg: Config) -> PaperTable:
    return run_paper_table(cfg)


def record_table(tracked: tracking.JobRun, cfg: Config, table: PaperTable) -> None:
    """Each method's validation curves and best AUC per stage, its seconds, its test metrics, the report and plots."""
    for result in table.results:
        for stage in result.stages:
            tracked.log_history(tracking.metric_key(result.spec.slug, stage["name"]), stage["history"])
            tracked.log_metrics({tracking.metric_key(result.spec.slug, stage["name"], "best_auc"): stage["best_auc"]})
        tracked.log_metrics({tracking.metric_key(result.spec.slug, "seconds"): result.seconds})
    tracked.log_report(table.metrics.to_pylist())
    names = ("metrics.md", "metrics.json", "auc_bars.png", "valid_auc.png", "score_dist.png")
    tracked.log_files([paper_uri(cfg, name) for name in names], PAPER_DIR, cfg.storage)


def _run_methods(cfg: Config, paper: PaperRun) -> PaperTable:
    started = time.perf_counter()
    device = paper.device
    specs = method_specs(cfg.paper.methods, cfg.paper.code_formats)
    log.info("paper table: %d methods on %d test rows (%d warm), device %s", len(specs), paper.test.num_rows,
             int(np.sum(paper.test.column("warm").to_numpy(zero_copy_only=False))), device)
    done, scored = paper.finished, {}
    skipped = []
    for spec in run_order(specs):
        result = _saved(cfg, spec, paper.test.num_rows)
        if result is None:
            budget = cfg.paper.time_budget_s
            if budget and time.perf_counter() - started > budget:
                skipped.append(spec.name)
                continue
            log.info("method %s ...", spec.name)
            result = paper.run(spec)
            _save(cfg, result)
        scored[spec] = evaluate_scores(paper.test, result.logits)
        log.info("method %s: test AUC %.4f, UAUC %.4f (%.0f s)", spec.name, scored[spec]["all_auc"],
                 scored[spec]["all_uauc"], result.seconds)
        done[spec] = result
    if skipped:
        log.warning("paper.time_budget_s (%d s) spent: not run %s; a rerun of this run.name adds them",
                    cfg.paper.time_budget_s, skipped)
    results = [done[s] for s in specs if s in done]
    extra, wanted, unblended = _beyond_paper(paper, results)
    for row in extra:
        scored[row.spec] = evaluate_scores(paper.test, row.logits)
        log.info("%s: test AUC %.4f", row.spec.name, scored[row.spec]["all_auc"])
    results += extra
    metrics = report_table({r.spec.name: scored[r.spec] for r in results})
    logits = {r.spec.name: r.logits for r in results}
    pairs = pairwise_report(logits, paper.test.column("label").to_numpy(zero_copy_only=False),
                            match_pairs(PAPER_PAIRS + wanted, list(logits)), N_BOOT, cfg.run.seed)
    text = "\n\n".join(t for t in (format_report(metrics), format_pairs(pairs)) if t)
    references = {}
    if MethodSpec("BinMF") in done and any(r.spec.method in CODE_METHODS for r in results):
        references["BinMF on the stage-2 validation rows"] = paper.binmf_valid_auc()
    if any(r.spec.method == TEACHER for r in extra):
        references[f"{TEACHER} (the teacher) on the stage-2 validation rows"] = paper.teacher_valid_auc()
    return PaperTable(metrics, results, paper.test, text, time.perf_counter() - started, skipped, device, pairs,
                      references, unblended)


def _beyond_paper(paper: PaperRun, results: list[MethodResult]) -> tuple[list[MethodResult], tuple, list[str]]:
    """The rows beyond the paper's (the "<method>+BinMF" blends, the CodeBits teacher), the pairs they add to the
    report, and the methods in paper.blend left without a blend row (and why)."""
    blended = [r for r in results if paper.blends(r.spec)]
    rows = [paper.blend_row(r) for r in blended if paper.can_blend(r)]
    unblended = [f"{r.spec.name} (its scores of the {paper.blend_rows.num_rows} blend validation rows are missing: "
                 f"finished by an earlier invocation; remove paper/methods/{r.spec.slug}.* to rerun it)"
                 for r in blended if not paper.can_blend(r)]
    if unblended:
        log.warning("no blend row for %s", "; ".join(unblended))
    for row in rows:
        log.info("%s: weights %s", row.spec.name, np.round(row.notes["blend"]["weights"], 3).tolist())
    pairs = blend_pairs(list(dict.fromkeys(r.spec.method for r in blended)))
    if paper.distils_code_bits() and any(r.spec.method in CODE_METHODS for r in results):
        started = time.perf_counter()
        logits = paper.teacher_logits(paper.test)
        if logits is not None:
            rows.append(MethodResult(MethodSpec(TEACHER), logits, time.perf_counter() - started, [],
                                     {"teacher": "tune.stage2.distill_teacher code_bits"}))
            pairs += TEACHER_PAIRS
    return rows, pairs, unblended


def _profile_notes(cfg: Config, test: pa.Table) -> list[str]:
    notes = []
    for name, stage in (("stage 1 (TO)", cfg.tune.stage1), ("stage 2 (IO, IT, BinLLM)", cfg.tune.stage2)):
        if stage.max_train_rows or stage.max_valid_rows:
            notes.append(f"LLM {name} subsampled: at most {stage.max_train_rows or 'all'} train and "
                         f"{stage.max_valid_rows or 'all'} valid rows")
    if cfg.paper.max_test_rows:
        notes.append(f"test rows subsampled: {test.num_rows} (seeded)")
    if cfg.paper.blend_valid_rows:
        notes.append(f"<method>+{BLEND_PARTNER} rows (beyond the paper): logistic regression on {BLEND_PARTNER}'s and "
                     f"the method's logits, fitted on {cfg.paper.blend_valid_rows} seeded validation rows at most")
    notes.append(f"warm: user and item each have >= {cfg.data.warm_min_train} train rows; codes for "
                 f"{'every id' if cfg.encoder.vocabulary == 'all' else 'ids seen in train (others: text-only prompt)'}")
    score = ("logit(' Yes') - logit(' No')" if cfg.llm.negative_answer else "the raw ' Yes' logit")
    notes.append(f"LLM score: {score}; model {cfg.llm.model}, dtype {cfg.llm.dtype}")
    return notes


def write_report(cfg: Config, table: PaperTable) -> None:
    """<run dir>/paper/: metrics.md, metrics.json, test_scores.parquet and the PNG plots."""
    test = table.test
    methods = [r.spec.name for r in table.results]
    scores = pa.concat_tables([
        pa.table({"user_id": test.column("user_id"), "item_id": test.column("item_id"), "label": test.column("label"),
                  "warm": test.column("warm"), "method": pa.array([r.spec.name] * test.num_rows, pa.string()),
                  "logit": pa.array(r.logits, pa.float32())})
        for r in table.results])
    storage.write_table(scores, paper_uri(cfg, "test_scores.parquet"), cfg.storage)
    rows = table.metrics.to_pylist()
    notes = _profile_notes(cfg, test)
    if table.skipped:
        notes.append(f"not run within paper.time_budget_s: {', '.join(table.skipped)}")
    notes += [f"no blend row for {name}" for name in table.unblended]
    machine = torch.cuda.get_device_name() if table.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    payload = {"run": cfg.run.name, "device": machine, "wall_seconds": table.seconds, "notes": notes,
               "methods": {r["method"]: r for r in rows},
               "pairs": table.pairs.to_pylist() if table.pairs is not None else [],
               "seconds": {r.spec.name: r.seconds for r in table.results},
               "stages": {r.spec.name: r.stages for r in table.results},
               "method_notes": {r.spec.name: r.notes for r in table.results},
               "valid_references": table.valid_references}
    storage.write_json(payload, paper_uri(cfg, "metrics.json"), cfg.storage)
    lines = [f"# The paper's table: run {cfg.run.name}", "", f"Device: {machine}; wall time {table.seconds:.0f} s "
             f"(this invocation; methods from earlier invocations are reused).", "", "```", table.text, "```", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["", "| method | seconds |", "|---|---|"] + [f"| {r.spec.name} | {r.seconds:.0f} |" for r in table.results]
    storage.write_bytes(("\n".join(lines) + "\n").encode(), paper_uri(cfg, "metrics.md"), cfg.storage)
    with tempfile.TemporaryDirectory(prefix="binllm-paper-") as tmp:
        files = {
            "auc_bars.png": plot_auc_bars(rows, Path(tmp, "auc_bars.png")),
            "valid_auc.png": plot_validation_curves({r.spec.name: r.stages for r in table.results},
                                                    Path(tmp, "valid_auc.png"), table.valid_references),
            "score_dist.png": plot_score_distributions(
                methods, [r.logits for r in table.results],
                test.column("label").to_numpy(zero_copy_only=False).astype(np.int8), Path(tmp, "score_dist.png")),
        }
        for name, path in files.items():
            storage.write_bytes(Path(path).read_bytes(), paper_uri(cfg, name), cfg.storage)
