"""Text-to-image transformer prior (DALL-E stage 2) as a family, trained on token shards (codec ``tokens``).

The token dataset's manifest says everything the family needs (``data_info``): ``text_vocab``, ``image_vocab``,
``image_grid``, ``image_shape``, the caption tokenizer (``tokenizer`` = {file, sha256, vocab_size}, the file beside
the manifest) and the dVAE export that made the image tokens (``dvae_export``, ``dvae_weights_sha256``). The
tokenizer turns prompts into ids; the dVAE decodes sampled image tokens into pixels. Both travel inside this
family's export (``tokenizer.model`` and ``dvae/...``), so an export samples from a prompt with torch alone. A
tokenizer or dVAE whose sha256 differs from the one recorded at training is refused, naming both digests.

Prompts longer than ``text_len`` BPE ids keep their first ``text_len`` ids (``text_ids`` reports the truncation
and the words the tokenizer could only spell with byte pieces).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer
from data_pipeline.manifest import DatasetError
from trainer.dalle.prior import DallePrior, PriorConfig, kind_losses
from trainer.families.base import Engine, Family, StepContext

DVAE_DIR = "dvae"
REQUIRED_INFO = ("text_vocab", "image_vocab", "image_grid")


def _mismatch(what: str, recorded: str, found: str, where: str) -> str:
    return (f"{where}: {what} sha256 {found} does not match the one recorded at training ({recorded}); "
            f"this model was trained with another {what}")


class DalleFamily(Family):
    name = "dalle"
    config_cls = PriorConfig
    takes_prompt = True
    draw_options = frozenset({"temperature", "top_k", "top_p"})

    def __init__(self, config: PriorConfig, data_info: Mapping[str, Any]) -> None:
        super().__init__(config, data_info)
        missing = [k for k in REQUIRED_INFO if k not in self.data_info]
        if missing:
            raise DatasetError(f"family 'dalle' trains on token shards (codec 'tokens'); the dataset's manifest extra "
                               f"lacks {missing} (codec: {self.data_info.get('codec', {}).get('name')!r})")
        self.text_vocab = int(self.data_info["text_vocab"])
        self.image_vocab = int(self.data_info["image_vocab"])
        self.grid = (int(self.data_info["image_grid"][0]), int(self.data_info["image_grid"][1]))
        self.text_len = config.text_len
        self.pad_id = self.text_vocab
        self._export_dir: str | None = None
        self._tokenizer: CaptionTokenizer | None = None
        self._dvae: tuple[Any, dict[str, nn.Module]] | None = None

    def build_modules(self) -> dict[str, nn.Module]:
        return {"model": DallePrior(self.config, self.text_vocab, self.image_vocab, self.grid)}

    def check_eval_data(self, eval_info: Mapping[str, Any], url: str) -> None:
        """The held-out tokens must come from the training tokens' dVAE and tokenizer: codes of another dVAE (of
        the same K and grid) would be scored as if they were this one's, and the held-out losses mean nothing."""
        facts = {"dvae_weights_sha256": lambda i: i.get("dvae_weights_sha256"),
                 "tokenizer sha256": lambda i: (i.get("tokenizer") or {}).get("sha256"),
                 "image_vocab": lambda i: i.get("image_vocab"), "image_grid": lambda i: list(i.get("image_grid") or []),
                 "text_vocab": lambda i: i.get("text_vocab")}
        differ = [f"{name} {get(eval_info)!r} vs the training data's {get(self.data_info)!r}"
                  for name, get in facts.items() if get(eval_info) != get(self.data_info)]
        if differ:
            raise DatasetError(f"data.eval {url}: tokenised differently from the training data ({'; '.join(differ)}):"
                               " tokenise both splits with one dVAE export and tokenizer (one `dgm tokenize` run)")

    # --- side files: tokenizer and dVAE -------------------------------------------------------------------
    def _tokenizer_url(self) -> str:
        if self._export_dir is not None:
            return os.path.join(self._export_dir, TOKENIZER_FILE)
        info = self.data_info.get("tokenizer")
        if not info or "dataset_url" not in self.data_info:
            raise DatasetError("the token dataset's manifest records no caption tokenizer (extra.tokenizer)")
        return storage.join(self.data_info["dataset_url"], info.get("file", TOKENIZER_FILE))

    @property
    def tokenizer(self) -> CaptionTokenizer:
        """The caption tokenizer, checked against the sha256 recorded at training."""
        if self._tokenizer is None:
            url = self._tokenizer_url()
            tokenizer = CaptionTokenizer.load(url)
            recorded = (self.data_info.get("tokenizer") or {}).get("sha256")
            if recorded and tokenizer.sha256 != recorded:
                raise DatasetError(_mismatch("tokenizer", recorded, tokenizer.sha256, url))
            self._tokenizer = tokenizer
        return self._tokenizer

    def _dvae_url(self) -> str:
        if self._export_dir is not None:
            return os.path.join(self._export_dir, DVAE_DIR)
        url = self.data_info.get("dvae_export")
        if not url:
            raise DatasetError("the token dataset's manifest names no dVAE export (extra.dvae_export)")
        if not storage.is_remote(url) and not os.path.isabs(url) and not os.path.exists(url):
            url = storage.join(self.data_info.get("dataset_url", "."), url)
        return url

    def _check_dvae_weights(self, dvae_config: Mapping[str, Any], url: str) -> None:
        recorded = self.data_info.get("dvae_weights_sha256")
        found = dvae_config.get("files", {}).get("model.safetensors")
        if recorded and found != recorded:
            raise DatasetError(_mismatch("dVAE", recorded, str(found), url))

    def dvae(self) -> tuple[Any, dict[str, nn.Module]]:
        """(dVAE family, its modules), loaded once with torch alone; grid and codebook must fit this model."""
        if self._dvae is None:
            from trainer.export import load_export_url

            url = self._dvae_url()
            family, modules, config = load_export_url(url)
            if family.name != "dvae":
                raise DatasetError(f"{url}: is a {family.name!r} export, not the dVAE ('dvae') that tokenised the data")
            self._check_dvae_weights(config, url)
            if tuple(family.grid) != self.grid or int(family.num_codes) != self.image_vocab:
                raise DatasetError(f"{url}: dVAE grid {tuple(family.grid)} / {family.num_codes} codes do not fit the "
                                   f"token data's grid {self.grid} / {self.image_vocab} codes")
            self._dvae = (family, modules)
        return self._dvae

    def export_files(self) -> dict[str, bytes]:
        """tokenizer.model and every file of the dVAE export (under dvae/)."""
        files = {TOKENIZER_FILE: self.tokenizer.to_bytes()}
        url = self._dvae_url()
        config_bytes = storage.read_bytes(storage.join(url, "config.json"))
        config = json.loads(config_bytes)
        self._check_dvae_weights(config, url)
        for name in config.get("files", {}):
            files[f"{DVAE_DIR}/{name}"] = storage.read_bytes(storage.join(url, name))
        files[f"{DVAE_DIR}/config.json"] = config_bytes
        return files

    def attach_export(self, export_dir: str) -> None:
        from trainer.export import ExportError

        self._export_dir, self._tokenizer, self._dvae = export_dir, None, None
        try:
            self.tokenizer  # noqa: B018 - load and check now, so a mismatched tokenizer is refused at load time
            self.dvae()  # and the bundled dVAE: a downloaded export's folder is removed once loading returns
        except (DatasetError, ValueError) as e:
            raise ExportError(str(e)) from e

    # --- text ------------------------------------------------------------------------------------------------
    def pad_ids(self, ids: Sequence[int]) -> tuple[list[int], bool]:
        """The truncation rule: keep the first ``text_len`` ids; fill the rest with PAD."""
        kept = [int(i) for i in ids[: self.text_len]]
        return kept + [self.pad_id] * (self.text_len - len(kept)), len(ids) > self.text_len

    def text_ids(self, prompt: str) -> tuple[torch.Tensor, bool, list[str]]:
        """(ids [text_len] PAD-filled, truncated?, words spelled with byte pieces) of a prompt. A prompt with no
        tokens (empty, spaces) is refused: training never shows a caption that starts with padding."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens: give the caption to draw")
        padded, truncated = self.pad_ids(ids)
        return torch.tensor(padded, dtype=torch.long), truncated, self.tokenizer.unknown_words(prompt)

    # --- training --------------------------------------------------------------------------------------------
    def collate(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        n_image = self.grid[0] * self.grid[1]
        text = np.full((len(samples), self.text_len), self.pad_id, dtype=np.int64)
        image = np.zeros((len(samples), n_image), dtype=np.int64)
        for i, s in enumerate(samples):
            ids, tokens = np.asarray(s["text"]), np.asarray(s["image_tokens"]).reshape(-1)
            if tokens.shape[0] != n_image:
                raise DatasetError(f"sample {s.get('key', i)!r}: {tokens.shape[0]} image tokens, the model's "
                                   f"grid {self.grid} needs {n_image}")
            if ids.size and (ids.min() < 0 or ids.max() >= self.text_vocab) or tokens.min() < 0 \
                    or tokens.max() >= self.image_vocab:
                raise DatasetError(f"sample {s.get('key', i)!r}: token ids outside text vocab "
                                   f"{self.text_vocab} / image vocab {self.image_vocab}")
            kept = ids[: self.text_len]
            text[i, : kept.shape[0]] = kept
            image[i] = tokens
        return {"text": torch.from_numpy(text), "image": torch.from_numpy(image),
                "valid": torch.tensor([bool(s.get("valid", True)) for s in samples])}

    def _losses(self, model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        text_logits, image_logits = model(batch["text"], batch["image"])
        text_ce, image_ce = kind_losses(text_logits, batch["text"], image_logits, batch["image"])
        valid = batch["valid"].float()
        denom = valid.sum().clamp(min=1)
        text_loss, image_loss = (text_ce * valid).sum() / denom, (image_ce * valid).sum() / denom
        loss = self.config.text_loss_weight * text_loss + self.config.image_loss_weight * image_loss
        return {"loss": loss, "text_loss": text_loss, "image_loss": image_loss}

    def train_step(self, engines: Mapping[str, Engine], batch: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        engine = engines["model"]
        out = self._losses(engine, batch)
        share = ctx.batch_share(batch["valid"].float().sum())
        out = {k: v * share for k, v in out.items()}
        engine.backward(out["loss"])
        engine.step()
        metrics = {k: float(v.detach()) for k, v in out.items()}
        scaler = engine.module.grad_scaler
        if scaler is not None:
            if dist.is_available() and dist.is_initialized():
                flags = scaler.overflow.to(torch.int32)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank keeps the same scales
                scaler.overflow.copy_(flags > 0)
            metrics["block_overflows"] = float(len(scaler.update()))
            metrics["block_scale_log2_mean"] = float(scaler.log2_scales.float().mean())
        return metrics

    @torch.no_grad()
    def evaluate(self, modules: Mapping[str, nn.Module], batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: float(v) for k, v in self._losses(modules["model"], batch).items()}

    # --- sampling --------------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | Sequence[str] | None, n: int) -> torch.Tensor:
        """[n, text_len] ids for one prompt (repeated), n prompts, or [n, 0] (None: the model draws captions too)."""
        if prompt is None:
            return torch.zeros(n, 0, dtype=torch.long)
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} samples")
        return torch.stack([self.text_ids(p)[0] for p in prompts])

    def generate_tokens(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator | None = None,
                        prompt: str | Sequence[str] | None = None, temperature: float = 1.0, top_k: int = 0,
                        top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(caption ids [n, text_len], image tokens [n, h, w]) drawn with the KV cache."""
        model = modules["model"]
        device = next(model.parameters()).device
        text, image = model.generate(self.prompt_ids(prompt, n).to(device), generator, temperature, top_k, top_p)
        return text, image.view(n, *self.grid)

    def decode_tokens(self, image_tokens: torch.Tensor) -> torch.Tensor:
        dvae_family, dvae_modules = self.dvae()
        with torch.no_grad():
            return dvae_family.decode_tokens(dvae_modules, image_tokens.cpu()).float()

    def sample_images(self, modules: Mapping[str, nn.Module], n: int, generator: torch.Generator,
                      prompt: str | Sequence[str] | None = None, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0) -> torch.Tensor:
        _, image = self.generate_tokens(modules, n, generator, prompt, temperature, top_k, top_p)
        return self.decode_tokens(image)
