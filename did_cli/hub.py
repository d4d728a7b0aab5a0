"""Sharing a checkpoint folder on the Hugging Face Hub: its model card's facts, and the upload.

* The card (`did_cli.model_card`) is rendered from files only: the folder's config.json; the run's settings.json and
  summary.json when the folder is a run's `final/` (the run folder is its parent, and its mix must be the one
  config.json records); and the `did eval-nll --json` / `did eval-ppl --json` files the user names. Evaluation files
  are checked against the weights: eval-nll rows count only when their model's sha256 is this folder's, eval-ppl
  sample files only when their records were sampled, every stage, with these weights (read from the records'
  provenance); anything else is left out and named in `skipped`.
* `push_folder` checks all it can before it writes or sends anything: the folder, the repository id, the evaluation
  files, a token, a reachable Hub. Only then does it rewrite the card (a card did wrote; a README.md of the user's is
  kept), create the repository when it is new and upload the folder in one commit (`HfApi.upload_folder`): the
  repository then holds all of the folder or none of it, and an error says which step failed and what exists.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from did_cli.checkpoints import EMBEDDED, file_sha256, has_tokenizer_files, hub_unreachable, read_config
from did_cli.config import ModelConfig
from did_cli.errors import HubError, InputError, ModelLoadError, UsageError
from did_cli.files import write_text_atomically
from did_cli.model_card import (
    GenPplEvaluation,
    NllEvaluation,
    TrainingFacts,
    is_did_card,
    render_card,
)
from did_cli.records import read_records

__all__ = [
    "Card",
    "PushResult",
    "build_card",
    "check_push",
    "files_to_upload",
    "push_folder",
    "training_facts",
    "write_card",
]

_WEIGHTS = "model.safetensors"
_CARD = "README.md"
_LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Settings that set how many tokens a step trains on.
_TOKEN_SETTINGS = ("batch_size", "seq_len")


@dataclass(frozen=True)
class Card:
    """A rendered model card and the evaluation entries left out of it (each with the reason)."""

    text: str
    skipped: tuple[str, ...] = ()


@dataclass(frozen=True)
class PushResult:
    """What `push_folder` uploaded, and where."""

    folder: Path
    repo_id: str
    revision: str
    commit_url: str | None
    files: tuple[str, ...]
    skipped: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the user."""
        where = self.commit_url or f"https://huggingface.co/{self.repo_id}/tree/{self.revision}"
        return f"pushed {self.folder} ({len(self.files)} files) to {self.repo_id}@{self.revision}: {where}"


# --- The card's facts --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {_first_line(exc)}") from None


def _run_folder(folder: Path) -> Path | None:
    parent = folder.resolve().parent
    if folder.resolve().name == "final" and (parent / "settings.json").exists() and (parent / "summary.json").exists():
        return parent
    return None


def _looks_like_hub_id(name: str, *bases: Path) -> bool:
    """A Hub id (`name` or `owner/name`) rather than a local file or folder (which may exist relative to `bases`)."""
    if not _HUB_ID.match(name) or name.endswith(_LOCAL_DATA_SUFFIXES) or name in EMBEDDED:
        return False
    return not any((base / name).exists() for base in (Path.cwd(), *bases))


def _shown(name: str) -> str:
    """A local path as a public card shows it: an absolute path (a home folder, a cluster's layout) by its name only."""
    return Path(name).name if Path(name).is_absolute() else name


def _tokens_seen(settings: dict[str, Any], overrides: list[dict[str, Any]], steps: int, model_length: int) -> int:
    """Steps x batch x length, summed over the stretches between settings changes made on resume."""
    changes = sorted((c for c in overrides if c.get("setting") in _TOKEN_SETTINGS), key=lambda c: c["step"])
    values = {name: settings[name] for name in _TOKEN_SETTINGS}
    for name in _TOKEN_SETTINGS:  # before its first change a setting had the value it changed from
        first = next((c for c in changes if c["setting"] == name), None)
        if first is not None:
            values[name] = first["from"]
    total, at = 0, 0
    for change in [*changes, {"step": steps, "setting": None}]:
        total += (min(change["step"], steps) - at) * values["batch_size"] * (values["seq_len"] or model_length)
        at = min(change["step"], steps)
        if change["setting"] is not None:
            values[change["setting"]] = change["to"]
    return total


def _start(settings: dict[str, Any], run: Path) -> tuple[str, str | None]:
    """How the run's model began (for the card) and the Hub id it came from (for the metadata)."""
    if settings.get("init"):
        return f"a fresh `{settings['init']}` model (random initialisation)", None
    name = str(settings.get("model"))
    if name in EMBEDDED:
        return f"`{name}` (embedded in did)", None
    if _looks_like_hub_id(name, run.parent):
        return f"[`{name}`](https://huggingface.co/{name})", name
    return f"the local checkpoint `{_shown(name)}`", None


def training_facts(folder: Path, config: ModelConfig) -> TrainingFacts | None:
    """What the run that exported `folder` (a run's `final/`) recorded, or None when it is not a run's export.

    Raises:
        InputError: the run's settings.json or summary.json is unreadable or lacks what every run writes.
    """
    run = _run_folder(folder)
    if run is None:
        return None
    record, summary = _read_json(run / "settings.json"), _read_json(run / "summary.json")
    try:
        settings = record["settings"]
        if config.extra.get("did_training_mix") not in (None, settings["mix"]):
            return None  # the folder holds weights of another run than the files beside it describe
        data = record.get("data") or {}
        length = settings["seq_len"] or config.model_length
        hub_data = data.get("hub", _looks_like_hub_id(settings["data"], run.parent))
        where = settings["data"] if hub_data else _shown(settings["data"])
        where = f"{where} ({settings['data_config']})" if settings.get("data_config") else where
        start, base_model = _start(settings, run)
        return TrainingFacts(
            steps=int(summary["steps"]),
            mix=settings["mix"],
            batch_size=int(settings["batch_size"]),
            length=int(length),
            tokens_seen=_tokens_seen(settings, record.get("overrides", []), int(summary["steps"]), config.model_length),
            start=start,
            base_model=base_model,
            data=where,
            hub_dataset=settings["data"] if hub_data else None,
            data_digest=data.get("fingerprint"),
            train_tokens=data.get("train_tokens"),
            validation_nelbo={int(k): float(v) for k, v in (summary.get("validation_nelbo") or {}).items()},
            did_version=(record.get("versions") or {}).get("did"),
            changes=tuple(
                f"`{c['setting']}` {json.dumps(c['from'])} → {json.dumps(c['to'])} at step {c['step']}"
                for c in record.get("overrides", [])
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{run}/settings.json or summary.json lacks what a did run writes ({exc!r})") from None


def _nll_evaluation(path: Path, sha256: str) -> NllEvaluation | None:
    body = _read_json(path)
    try:
        labels = [label for label, model in body["models"].items() if model.get("sha256") == sha256]
        results = tuple(row for row in body["results"] if row["model"] in labels)
        data = dict(body["data"][labels[0]]) if labels else {}
        if isinstance(data.get("source"), dict) and isinstance(data["source"].get("source"), str):
            data["source"] = {**data["source"], "source": _shown(data["source"]["source"])}
        settings = body["settings"]
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{path} is not a `did eval-nll --json` file") from None
    return NllEvaluation(path.name, results, data, settings) if results else None


def _sample_stages(samples: Path) -> tuple[set[str | None], tuple[dict[str, Any], ...]]:
    """The sha256 of every model a did sample file's first record names (its own, each stage's), and its stages.

    The first record speaks for the file: did's writers refuse to add records of another model to a file.

    Raises:
        InputError: not a file of did records.
    """
    first = next(iter(read_records(samples)), None)
    if first is None:
        raise InputError(f"{samples} holds no records")
    models = {first.model.get("sha256"), *((stage.get("model") or {}).get("sha256") for stage in first.stages)}
    keys = ("kind", "block_size", "gamma", "remask", "top_p", "temperature")
    return models, tuple({k: stage.get(k) for k in keys} for stage in first.stages)


def _gen_ppl_evaluations(path: Path, sha256: str) -> tuple[list[GenPplEvaluation], list[str]]:
    body = _read_json(path)
    try:
        files, judge, settings = body["files"], body["judge"], body["settings"]
        judge_name = judge.get("name", "?")
    except (KeyError, TypeError, AttributeError):
        raise InputError(f"{path} is not a `did eval-ppl --json` file") from None
    kept, skipped = [], []
    for name, numbers in files.items():
        samples = next((p for p in (Path(name), path.parent / name) if p.is_file()), None)
        if samples is None:
            skipped.append(f"{path.name}: {name} (not found, so which model made it cannot be checked)")
            continue
        try:
            models, stages = _sample_stages(samples)
        except InputError:
            skipped.append(f"{path.name}: {name} (not did sample records)")
            continue
        if models != {sha256}:
            skipped.append(f"{path.name}: {name} (sampled with other weights)")
            continue
        kept.append(GenPplEvaluation(path.name, _shown(name), stages, numbers, _shown(judge_name), settings))
    return kept, skipped


def build_card(
    folder: str | Path,
    *,
    repo_id: str | None = None,
    eval_nll: Sequence[str | Path] = (),
    eval_ppl: Sequence[str | Path] = (),
    license_id: str | None = None,
) -> Card:
    """The model card of a checkpoint folder, from its files, its run's files and the evaluation outputs given.

    Args:
        folder: a did checkpoint folder (config.json, model.safetensors); a run's `final/` adds the run's facts.
        repo_id: the Hub repository the card is for (its usage snippets).
        eval_nll: `did eval-nll --json` files; only rows of these weights (by sha256) are reported.
        eval_ppl: `did eval-ppl --json` files; only sample files made with these weights are reported.
        license_id: a license id for the card's metadata.

    Raises:
        ModelLoadError: `folder` is not a checkpoint folder.
        InputError: an evaluation file is unreadable, not did's, or holds nothing about these weights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is not a folder; pass a did checkpoint folder (config.json, {_WEIGHTS})")
    config = read_config(folder)
    weights = folder / _WEIGHTS
    if not weights.exists():
        raise ModelLoadError(f"{folder} has no {_WEIGHTS}")
    sha256 = file_sha256(weights)
    nll = []
    for path in map(Path, eval_nll):
        evaluation = _nll_evaluation(path, sha256)
        if evaluation is None:
            raise InputError(f"{path} has no results for the weights in {folder} (sha256 {sha256[:12]}…)")
        nll.append(evaluation)
    gen_ppl, skipped = [], []
    for path in map(Path, eval_ppl):
        kept, left_out = _gen_ppl_evaluations(path, sha256)
        if not kept:
            raise InputError(f"{path} scores no samples made with the weights in {folder}: " + "; ".join(left_out))
        gen_ppl += kept
        skipped += left_out
    text = render_card(
        config,
        repo_id=repo_id,
        training=training_facts(folder, config),
        nll=nll,
        gen_ppl=gen_ppl,
        has_tokenizer_files=has_tokenizer_files(folder),
        weights_dtype=_weights_dtype(weights),
        license_id=license_id,
    )
    return Card(text, tuple(skipped))


def _weights_dtype(weights: Path) -> str | None:
    """The stored dtype of the parameters (the embedding's; buffers such as rotary frequencies stay float32)."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            stored = handle.get_slice("backbone.vocab_embed.embedding").get_dtype()
    except Exception:  # safetensors raises its own error types; the dtype is only described
        return None
    return names.get(stored, stored)


def write_card(folder: str | Path, card: Card | None = None, **facts: Any) -> Card:
    """Write `folder`/README.md from `build_card(folder, **facts)` (or `card`), unless the user wrote that file.

    A README.md without did's marker is the user's and is kept.

    Raises:
        UsageError: evaluations or a license were asked for but README.md is the user's.
        (and what `build_card` raises)
    """
    folder = Path(folder)
    _check_card_is_ours(folder, facts)
    card = card or build_card(folder, **facts)
    readme = folder / _CARD
    current = readme.read_text(encoding="utf-8", errors="replace") if readme.exists() else None
    if current is not None and not is_did_card(current):
        return Card(current, card.skipped)
    if current != card.text:
        write_text_atomically(readme, card.text)
    return card


def _check_card_is_ours(folder: Path, facts: dict[str, Any]) -> None:
    readme = folder / _CARD
    asked = facts.get("eval_nll") or facts.get("eval_ppl") or facts.get("license_id")
    if asked and readme.exists() and not is_did_card(readme.read_text(encoding="utf-8", errors="replace")):
        raise UsageError(f"{readme} was not written by did; remove it to let did write a card with these facts")


# --- The upload --------------------------------------------------------------------------------------------------


def check_push(repo_id: str) -> str:
    """The token to push with, after checking the repository id, that a token exists and the Hub is reachable.

    Answers in seconds and writes nothing.

    Raises:
        UsageError: `repo_id` is not a repository id.
        HubError: no token, or the Hub cannot be reached (offline mode, no route).
    """
    from huggingface_hub.utils import get_token, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError:
        raise UsageError(f"{repo_id!r} is not a Hugging Face repository id (owner/name)") from None
    token = get_token()
    if not token:
        raise HubError("no Hugging Face token: run `hf auth login` or set HF_TOKEN, then push again")
    reason = hub_unreachable()
    if reason is not None:
        raise HubError(f"cannot push to the Hugging Face Hub: {reason}")
    return token


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    eval_nll: Sequence[str | Path] = (),
    eval_ppl: Sequence[str | Path] = (),
    license_id: str | None = None,
    commit_message: str | None = None,
) -> PushResult:
    """Upload a did checkpoint folder to a Hub model repository, with its model card, in one commit.

    Args:
        folder: the checkpoint folder (e.g. a run's `final/`).
        repo_id: `owner/name` of the model repository; created when it does not exist.
        private: create the repository private; an existing public repository is refused rather than published to.
        revision: the branch to push to (created from main when new); default main.
        eval_nll: `did eval-nll --json` files to report in the card (see `build_card`).
        eval_ppl: `did eval-ppl --json` files to report in the card.
        license_id: a license id for the card's metadata.
        commit_message: the commit's message.

    Returns:
        A PushResult.

    Raises:
        UsageError, ModelLoadError, InputError: before anything is written or sent.
        HubError: no token or no Hub (before anything is written), or the Hub refused a step (the message says
            which, and that nothing of the folder was committed).
    """
    folder = Path(folder)
    facts = {"repo_id": repo_id, "eval_nll": eval_nll, "eval_ppl": eval_ppl, "license_id": license_id}
    card = build_card(folder, **facts)
    _check_card_is_ours(folder, facts)
    token = check_push(repo_id)
    card = write_card(folder, card, **facts)
    branch = revision or "main"
    commit = _upload(folder, repo_id, token, private, revision, commit_message or f"Upload {folder.name} with did")
    return PushResult(
        folder, repo_id, branch, getattr(commit, "commit_url", None), files_to_upload(folder), card.skipped
    )


def files_to_upload(folder: str | Path) -> tuple[str, ...]:
    """The files of `folder` a push uploads: all but hidden ones (staging folders, caches), as relative paths."""
    folder = Path(folder)
    paths = (p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    return tuple(sorted(str(p) for p in paths if not any(part.startswith(".") for part in p.parts)))


def _upload(folder: Path, repo_id: str, token: str, private: bool, revision: str | None, message: str) -> Any:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    nothing = "nothing was uploaded"
    # huggingface_hub raises HTTP, network and validation errors of many types; each becomes one line here.
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except Exception as exc:
        raise HubError(f"could not create or open {repo_id} on the Hub: {_first_line(exc)}; {nothing}") from None
    try:
        if private and not api.model_info(repo_id).private:
            raise HubError(
                f"{repo_id} already exists and is public, so it cannot take a private push; {nothing} "
                "(make it private on the Hub first, or push without asking for a private repository)"
            )
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except HubError:
        raise
    except Exception as exc:
        raise HubError(
            f"{repo_id} exists on the Hub but could not be prepared: {_first_line(exc)}; {nothing}"
        ) from None
    try:
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=revision,
            commit_message=message,
            ignore_patterns=[".*", "**/.*"],
        )
    except Exception as exc:
        branch = revision or "main"
        raise HubError(
            f"uploading {folder} to {repo_id} failed: {_first_line(exc)}; the Hub commits a folder in one commit, so "
            f"{repo_id}@{branch} holds none of it (see https://huggingface.co/{repo_id}/commits/{branch}); "
            "push again when the cause is fixed"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
