"""Small token datasets written in-process: captioned shape scenes, a caption tokenizer and a dVAE export in, token
shards (codec ``tokens``) with the manifest the ``dalle`` family reads out.

The tokenisation job (``tokenise_job``) is the way to tokenise a prepared dataset at scale on Ray workers; this is
the few-hundred-sample, single-process version that the prior's tests and its benchmark use when no tokenised data
set exists yet. Its manifest records the same facts (vocabularies, grid, tokenizer, dVAE export and weights).
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from data_pipeline import storage
from data_pipeline.caption_tokenizer import TOKENIZER_FILE, CaptionTokenizer
from data_pipeline.codecs.tokens import TokenSample, TokensCodec, TokensCodecConfig
from data_pipeline.manifest import Manifest, save_manifest
from data_pipeline.prepare import INDEX_STRIDE, ShardPlan, publish_shard
from data_pipeline.sources.shapes import ShapesConfig, ShapesSource


def write_token_dataset(output: str, scenes: ShapesConfig, tokenizer: CaptionTokenizer, dvae_export: str,
                        samples_per_shard: int = 128, batch_size: int = 64) -> Manifest:
    """Tokenise ``scenes`` (captions with ``tokenizer``, images with the dVAE export's argmax codes) into shards."""
    from trainer.export import load_export

    dvae_family, dvae_modules, dvae_config = load_export(dvae_export)
    source = ShapesSource(scenes)
    samples: list[TokenSample] = []
    for lo in range(0, len(source), batch_size):
        scene = [source.sample(i) for i in range(lo, min(lo + batch_size, len(source)))]
        with torch.no_grad():
            codes = dvae_family.encode_tokens(dvae_modules, np.stack([s.image for s in scene]))
        for s, c in zip(scene, codes, strict=True):
            samples.append(TokenSample(key=s.key, text=np.asarray(tokenizer.encode(s.caption)),
                                       image_tokens=c.reshape(-1).numpy(), caption=s.caption,
                                       attributes=s.attributes))
    grid = [int(g) for g in dvae_family.grid]
    codec = TokensCodec(TokensCodecConfig(text_vocab=tokenizer.vocab_size, image_vocab=int(dvae_family.num_codes),
                                          image_grid=grid))
    fingerprint = hashlib.sha256(json.dumps([scenes.__dict__, tokenizer.sha256, dvae_config["files"]],
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
    infos = []
    for index, first in enumerate(range(0, len(samples), samples_per_shard)):
        stop = min(first + samples_per_shard, len(samples))
        plan = ShardPlan(index, f"shard-{index:06d}.tar", first, stop, fingerprint)

        def fill(writer, first: int = first, stop: int = stop) -> None:  # noqa: ANN001
            for sample in samples[first:stop]:
                writer.write({"__key__": sample.key, **codec.encode(sample)})

        infos.append(publish_shard(output, plan, fill))
    tokenizer.save(storage.join(output, TOKENIZER_FILE))
    weights_sha = dvae_config["files"]["model.safetensors"]
    manifest = Manifest(
        source={"name": "token_data", "settings": {"scenes": scenes.__dict__}},
        codec={"name": "tokens", "settings": codec.settings()},
        shards=infos,
        extra={"samples_per_shard": samples_per_shard, "index_stride": INDEX_STRIDE,
               "text_vocab": tokenizer.vocab_size, "image_vocab": int(dvae_family.num_codes), "image_grid": grid,
               "image_shape": [scenes.resolution, scenes.resolution, 3], "tokenizer": tokenizer.info(),
               "dvae_export": os.path.abspath(dvae_export), "dvae_weights_sha256": weights_sha},
        url=output,
    )
    save_manifest(output, manifest)
    return manifest
