"""What produced an output, and the one rule that says whether existing records were made as a run would make them.

Every record names what made it: package versions, the model (name, sha256) and tokenizer, the device and dtype, and
per stage the settings and provenance (`draft_stage_settings`, `refine_stage_settings`, `stage_provenance`).

`made_with(records, expected)` is the record contract: were these records made from these inputs, weights and
settings? `--resume` (draft, refine, generate) and the sweep's reuse of sample files both ask it, so a file is
reused exactly when a resume would keep it. It compares everything that changes a record:

* the inputs: for drafting runs the prompt text and its token ids for each sample id (so a changed `--prompt`, or a
  changed `-n` that moves a prompt to other ids, is refused) and that the id is one this run makes; for refining
  runs the input record of the same id (its tokens and confidences, reconstructed from the refined record's
  `remasked` / `previous_*` fields, and its earlier stages), so another drafts file is refused;
* the weights (sha256), the tokenizer (vocabulary size, and its name where it is a Hub or embedded name), the dtype
  and KV-cache dtype of every stage;
* every sampler setting and the seed of every stage this run makes.

Timing, batch size, device and process count are information, never compared: they do not change a sample's tokens.
Keys added to records after they were first written take, in `LEGACY_VALUES`, the value older files were made with.
"""

from __future__ import annotations

import dataclasses
import platform
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from did_cli.records import Record
from did_cli.settings import DraftSettings, EditSettings, RefineSettings

__all__ = [
    "LEGACY_VALUES",
    "Expected",
    "Identity",
    "device_info",
    "draft_stage_settings",
    "edit_stage_settings",
    "expect_drafts",
    "expect_refinements",
    "made_with",
    "model_info",
    "record_model",
    "refine_stage_settings",
    "stage_settings",
    "stage_provenance",
    "tokenizer_info",
    "versions",
]


# --- Versions, model, tokenizer, device ------------------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of did and of the libraries whose behaviour changes its numbers."""
    return {
        "did": package_version("did"),
        "torch": package_version("torch"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
    }


def model_info(model: Any) -> dict[str, Any]:
    """Name, weights hash and revision of a loaded model (see checkpoints.ModelSource).

    A model loaded from a local folder also gets `path`, the folder's absolute path, so a record still names a
    loadable model when it is read from another working directory (embedded names and Hub ids resolve anywhere).
    """
    source = getattr(model, "source", None)
    if source is None:
        return {"name": "<in-memory>", "sha256": None, "revision": None}
    info = {"name": source.name, "sha256": source.sha256, "revision": source.revision}
    folder = local_folder(source.name)
    if folder is not None:
        info["path"] = folder
    return info


def local_folder(name: str) -> str | None:
    """The absolute path of `name` when it is a local folder (not an embedded model name), else None."""
    from did_cli.checkpoints import EMBEDDED

    if not name or name in EMBEDDED or name.startswith("<"):
        return None
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def record_model(record: Any) -> str | None:
    """The model that made a record's latest stage, as a name `load_model` accepts from any working directory."""
    stages = getattr(record, "stages", None) or []
    info = (stages[-1].get("model") if stages else None) or getattr(record, "model", None) or {}
    path, name = info.get("path"), info.get("name")
    if path and Path(path).is_dir():
        return str(path)
    if name and not str(name).startswith("<"):
        return str(name)
    return None


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """Name and size of a tokenizer: enough to refuse records made with another vocabulary.

    A tokenizer that ships with an embedded model is named by that model's name, not by the folder it was installed
    to, so records stay comparable across installations.
    """
    from did_cli.checkpoints import EMBEDDED, tokenizer_source

    source = tokenizer_source(tokenizer)
    name = source.name
    for embedded, folder in EMBEDDED.items():
        if name == str(folder):
            name = embedded
    info = {"name": local_folder(name) or name, "vocab_size": len(tokenizer)}
    if source.path is not None and name not in EMBEDDED:
        info["path"] = str(Path(source.path).resolve())  # the folder actually read
    return info


def device_info(device: Any) -> str:
    """A readable device name (the GPU model on CUDA), for a `torch.device`."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def stage_provenance(model: Any) -> dict[str, Any]:
    """What ran a stage: the model, device, weights dtype and KV-cache dtype.

    Per stage, because a refinement may run another model (with --force), dtype or device than the draft did. The
    cache dtype is that of cached calls: bfloat16 under float32 weights is BD3-LM's numerics.
    """
    info = model_info(model)
    return {
        "model": {key: info[key] for key in ("name", "path", "sha256") if key in info},
        "device": device_info(model.device),
        "dtype": _dtype_name(model.dtype),
        "kv_cache_dtype": _dtype_name(model.kv_cache_dtype or model.dtype),
    }


def run_provenance(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The drafting run's record-level provenance: model, tokenizer, versions, device, dtype."""
    return {
        "model": model_info(model),
        "tokenizer": tokenizer_info(tokenizer),
        "versions": versions(),
        "device": device_info(model.device),
        "dtype": _dtype_name(model.dtype),
    }


# --- Stage settings ---------------------------------------------------------------------------------------------------


STOP_RULE = "bd3lm"


def draft_stage_settings(settings: DraftSettings, seed: int) -> dict[str, Any]:
    """The settings a draft stage records: what must agree for two drafts to be the same samples."""
    return {
        "kind": "draft",
        "length": settings.length,
        "block_size": settings.block_size,
        "kv_cache": settings.kv_cache,
        **dataclasses.asdict(settings.unmasking),
        "reject_entropy": settings.reject_entropy,
        "max_tries": settings.max_tries,
        "entropy_window": settings.entropy_window,
        "var_length": settings.var_length,
        # Which stop rules cut a variable-length draft: BD3-LM's (checks only past the entropy window, a low-entropy
        # cut over an EOS cut, redraws at block size 1), since did 0.2; records before it lack the key.
        "stop_rule": STOP_RULE,
        "seed": seed,
    }


def refine_stage_settings(settings: RefineSettings, seed: int, length: int | None) -> dict[str, Any]:
    """The settings a refine stage records; `length` resolves B2 = None to the whole sequence.

    With `length` None, B2 = None stays None: `made_with` then expects each record's own length (a variable-length
    sample's global block is as long as the sample).
    """
    return {
        "kind": "refine",
        "block_size": settings.block_size or length,
        "gamma": settings.gamma,
        "remask": settings.remask,
        "kv_cache": settings.kv_cache,
        **dataclasses.asdict(settings.unmasking),
        "refine_cache": settings.refine_cache,
        "passes": settings.passes,
        "ensemble_ratio": settings.ensemble_ratio,
        "seed": seed,
    }


def edit_stage_settings(settings: EditSettings, seed: int) -> dict[str, Any]:
    """The settings an edit stage records (`did_cli.sampling.edit`)."""
    return {
        "kind": "edit",
        "threshold": settings.threshold,
        "passes": settings.passes,
        "candidate": settings.candidate,
        "top_p": settings.unmasking.top_p,
        "temperature": settings.unmasking.temperature,
        "seed": seed,
    }


def stage_settings(settings: RefineSettings | EditSettings, seed: int, length: int | None) -> dict[str, Any]:
    """The settings a revision stage records, remasking or editing."""
    if isinstance(settings, EditSettings):
        return edit_stage_settings(settings, seed)
    return refine_stage_settings(settings, seed, length)


def _length_of(record: Record, stage: dict[str, Any]) -> Any:
    return len(record.tokens)


# Stage keys added after records were first written, with the value every earlier record was made with (as a
# function of the record and the stage, for values that were implied by other fields).
LEGACY_VALUES: dict[str, Callable[[Record, dict[str, Any]], Any]] = {
    "length": _length_of,  # before variable length, a draft was as long as its tokens
    "reject_entropy": lambda record, stage: 0.0,  # before BD3-LM's entropy rejection, nothing was redrawn
    "max_tries": lambda record, stage: 1,
    "var_length": lambda record, stage: False,
    # Variable-length drafts were cut by did's own rule before BD3-LM's; fixed-length drafts never depended on it.
    "stop_rule": lambda record, stage: "did-0.1" if stage.get("var_length") else STOP_RULE,
    "entropy_window": lambda record, stage: 256,
    "confidence_threshold": lambda record, stage: None,
    "refine_cache": lambda record, stage: 1,
    # Read only by strategies that did not exist before these keys; earlier records were made with the defaults.
    "passes": lambda record, stage: 8,
    "ensemble_ratio": lambda record, stage: 0.5,
    "model": lambda record, stage: record.model,  # per-stage provenance came later than the record's own
    "dtype": lambda record, stage: record.dtype,
    "kv_cache_dtype": lambda record, stage: stage.get("dtype", record.dtype),
}


def _stage_value(record: Record, stage: dict[str, Any], key: str) -> Any:
    if key in stage:
        return stage[key]
    legacy = LEGACY_VALUES.get(key)
    return legacy(record, stage) if legacy is not None else None


# --- The record contract ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """What makes records besides the settings: the weights, their numerics and the tokenizer.

    Attributes:
        sha256: the weights file's sha256 (None for an in-memory model: not compared).
        dtype: the weights dtype (`float32`, ...).
        kv_cache_dtype: the dtype of cached calls.
        tokenizer: `tokenizer_info` of the tokenizer.
    """

    sha256: str | None
    dtype: str
    kv_cache_dtype: str
    tokenizer: dict[str, Any]

    @classmethod
    def of(cls, model: Any, tokenizer: Any) -> Identity:
        """The identity of a loaded model and its tokenizer."""
        stage = stage_provenance(model)
        return cls(stage["model"].get("sha256"), stage["dtype"], stage["kv_cache_dtype"], tokenizer_info(tokenizer))


@dataclass(frozen=True)
class Expected:
    """What records made by one run must show (build it with `expect_drafts` or `expect_refinements`).

    Attributes:
        identity: the weights, numerics and tokenizer.
        seed: the run's seed.
        stages: the settings of the stages the run makes, in order (the last `len(stages)` stages of each record).
        prompts: drafting runs: (prompt text or None, its ids with BOS) per prompt, in order.
        num_samples: drafting runs: samples per prompt; sample `id` belongs to prompt `id // num_samples`.
        inputs: refining runs: the input record of each id.
    """

    identity: Identity
    seed: int
    stages: tuple[dict[str, Any], ...]
    prompts: tuple[tuple[str | None, tuple[int, ...]], ...] = ()
    num_samples: int = 0
    inputs: Mapping[int, Record] | None = None

    @property
    def ids(self) -> list[int]:
        """The ids of a complete output, in order."""
        if self.inputs is not None:
            return list(self.inputs)
        return list(range(self.num_samples * len(self.prompts)))

    def difference(self, record: Record) -> str | None:
        """The first way `record` differs from what this run would make, as a sentence; None when it does not."""
        found = self._input_difference(record)
        if found is not None:
            return found
        tokenizer = record.tokenizer or {}
        ours = self.identity.tokenizer
        if tokenizer.get("vocab_size", ours.get("vocab_size")) != ours.get("vocab_size"):
            theirs = tokenizer["vocab_size"]
            return f"sample {record.id} used a tokenizer of {theirs} tokens, this run's has {ours['vocab_size']}"
        if "path" not in tokenizer and "path" not in ours and tokenizer.get("name", ours["name"]) != ours["name"]:
            return f"sample {record.id} was tokenized by {tokenizer['name']}, this run uses {ours['name']}"
        new = record.stages[len(record.stages) - len(self.stages) :]
        for stage, expected in zip(new, self.stages, strict=True):
            found = self._stage_difference(record, stage, expected)
            if found is not None:
                return found
        return None

    def _input_difference(self, record: Record) -> str | None:
        where = f"sample {record.id}"
        if self.inputs is None:
            if len(record.stages) != len(self.stages):
                return f"{where} has {len(record.stages)} stages, this run makes {len(self.stages)}"
            if record.seed != self.seed:
                return f"{where} was made with seed {record.seed}, this run uses {self.seed}"
            total = self.num_samples * len(self.prompts)
            if not 0 <= record.id < total:
                return f"{where} is not one of the {total} samples this run makes (ids 0-{total - 1})"
            text, ids = self.prompts[record.id // self.num_samples]
            if record.prompt != text:
                return f"{where} was made for the prompt {record.prompt!r:.60}, this run gives it {text!r:.60}"
            if tuple(record.tokens[: record.prompt_len]) != ids:
                return f"{where} starts with other prompt tokens than this run's tokenizer makes of its prompt"
            return None
        source = self.inputs.get(record.id)
        if source is None:
            return f"{where} is not among this run's input records"
        if len(record.stages) != len(source.stages) + len(self.stages):
            return f"{where} has {len(record.stages)} stages, this run makes {len(source.stages) + len(self.stages)}"
        earlier = record.stages[: len(source.stages)]
        same = (record.seed, record.prompt, record.prompt_len, earlier) == (
            source.seed,
            source.prompt,
            source.prompt_len,
            source.stages,
        )
        if not same or (source.draft_tokens or source.tokens) != record.draft_tokens:
            return f"{where} was refined from another record than the input's sample {record.id}"
        restored = _refined_from(record)
        if restored is None:
            return f"{where} has a damaged refine stage (its remasked positions do not fit its tokens)"
        tokens, confidence, remasked = restored
        stored = [c if i in remasked else _as_stored(c) for i, c in enumerate(source.confidence)]
        if tokens != source.tokens:
            return f"{where} was refined from other tokens than the input's sample {record.id} holds"
        if confidence != stored:
            return f"{where} was refined from other confidences than the input's sample {record.id} holds"
        return None

    def _stage_difference(self, record: Record, stage: dict[str, Any], expected: dict[str, Any]) -> str | None:
        kind = stage.get("kind")
        for key, value in expected.items():
            if key == "block_size" and value is None:
                value = len(record.tokens)  # one global block over a (variable-length) record
            theirs = _stage_value(record, stage, key)
            if theirs != value:
                return f"sample {record.id} was made with {kind} {key}={theirs!r}, this run uses {value!r}"
        weights = (_stage_value(record, stage, "model") or {}).get("sha256")
        if self.identity.sha256 and weights and weights != self.identity.sha256:
            return f"sample {record.id} was made by other weights ({weights[:12]}), not {self.identity.sha256[:12]}"
        # Numerics change tokens in bf16: a file mixing dtypes would not be one run's samples.
        for key in ("dtype", "kv_cache_dtype"):
            theirs, ours = _stage_value(record, stage, key), getattr(self.identity, key)
            if theirs is not None and theirs != ours:
                return f"sample {record.id} was made with {key} {theirs}, this run uses {ours}"
        return None


def _as_stored(confidence: float) -> float:
    """A confidence as a refinement stores a kept position's value: through float32, to 7 significant digits."""
    return float(f"{struct.unpack('f', struct.pack('f', confidence))[0]:.7g}")


def _refined_from(record: Record) -> tuple[list[int], list[float], set[int]] | None:
    """The tokens and confidences the last revision stage started from, and the positions it changed (None: damaged).

    A refine stage lists the positions it remasked, an edit stage those it replaced; each keeps what they held before.
    """
    stage = record.stages[-1]
    changed = "edited" if stage.get("kind") == "edit" else "remasked"
    remasked, tokens, confidence = (stage.get(k) for k in (changed, "previous_tokens", "previous_confidence"))
    lists = (remasked, tokens, confidence)
    if not all(isinstance(v, list) for v in lists) or not len(remasked) == len(tokens) == len(confidence):
        return None
    before_tokens, before_confidence = list(record.tokens), list(record.confidence)
    for position, token, value in zip(remasked, tokens, confidence, strict=True):
        if not isinstance(position, int) or not 0 <= position < len(before_tokens):
            return None
        before_tokens[position], before_confidence[position] = token, value
    return before_tokens, before_confidence, set(remasked)


def made_with(records: Iterable[Record], expected: Expected) -> str | None:
    """Whether records were made from these inputs, weights and settings: None if so, else the first difference.

    The one predicate behind `--resume` and the sweep's reuse (see the module docstring for what it compares). It
    does not ask whether the records are complete: a resumed run keeps a prefix; `Expected.ids` lists a whole run.

    Returns:
        None, or one sentence naming the first difference (e.g. `sample 3 was made with draft top_p=0.9, this run
        uses 0.5`).
    """
    seen: set[int] = set()
    for record in records:
        if record.id in seen:
            return f"sample {record.id} appears twice"
        seen.add(record.id)
        found = expected.difference(record)
        if found is not None:
            return found
    return None


def expect_drafts(
    identity: Identity,
    settings: DraftSettings,
    seed: int,
    prompts: Sequence[tuple[str | None, Sequence[int]]],
    num_samples: int,
    refinements: Sequence[RefineSettings | EditSettings] = (),
) -> Expected:
    """What a drafting run (`draft`, or `generate` with `refinements`) makes.

    Args:
        identity: the model and tokenizer that make the records.
        settings: the draft stage.
        seed: the run's seed.
        prompts: (prompt text or None, ids with BOS) per prompt (`api.encode_prompts`).
        num_samples: samples per prompt.
        refinements: the refine stages `generate` runs after drafting.
    """
    stages = [draft_stage_settings(settings, seed)]
    stages += [stage_settings(s, seed, None) for s in refinements]  # B2 = None: each record's own length
    encoded = tuple((text, tuple(ids)) for text, ids in prompts)
    return Expected(_json_values(identity), seed, tuple(_json_values(s) for s in stages), encoded, num_samples)


def expect_refinements(
    identity: Identity, settings: RefineSettings | EditSettings, seed: int, inputs: Iterable[Record]
) -> Expected:
    """What refining or editing `inputs` (records of `draft` or an earlier stage) makes; B2 None: each one's length."""
    by_id = {record.id: record for record in inputs}
    stage = _json_values(stage_settings(settings, seed, None))
    return Expected(_json_values(identity), seed, (stage,), inputs=by_id)


def _json_values(value: Any) -> Any:
    """Settings as they read back from JSON (tuples as lists), so they compare equal to a stored record's."""
    import json

    if isinstance(value, Identity):
        return dataclasses.replace(value, tokenizer=json.loads(json.dumps(value.tokenizer)))
    return json.loads(json.dumps(value))
