"""Toy-size pipelines built in-process: real diffusers classes, seeded weights (each family's builder is in
its module, pipeline/families/; the parts they share are here).

Why: tests and the default run need the real architectures (so quantization touches the same
module paths as on the full models) without any download. Tokenizers are trained in-process on a
small built-in corpus, so everything here is offline and deterministic.
"""

from __future__ import annotations

import functools

import torch

from pipeline.config.schema import ModelConfig, TinySpec

# A fixed corpus: enough English for a byte-level BPE to learn common words, plus the chat
# template Qwen-Image wraps prompts in.
_CORPUS = [
    "a photo of a cat sitting on a red chair in the sun",
    "a watercolor painting of a lighthouse on a rocky coast at dawn",
    "a bowl of ramen with an egg, studio lighting, product shot",
    "an astronaut riding a horse on the moon, cinematic, detailed",
    "a small robot reading a book in a cozy library, warm colors",
    "the word hello written in neon letters on a brick wall",
    "a blue ceramic mug on a wooden table, soft shadows, minimal",
    "a city street at night in the rain with reflections",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background",
    "blurry, low quality, watermark, distorted, bad anatomy, text, jpeg artifacts",
]
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _train_bpe(specials: list[str], vocab_size: int, eos: str | None):
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic, milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    if eos is not None:  # CLIP and T5 append an end token; CLIP pools the hidden state there
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", special_tokens=[(eos, tok.token_to_id(eos))]
        )
    return tok


def _fast_tokenizer(specials: list[str], vocab_size: int, max_length: int, pad: str, eos: str | None):
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(specials, vocab_size, eos)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, eos_token=eos or pad, model_max_length=max_length
    )


@functools.lru_cache(maxsize=None)
def _tokenizer_cached(kind: str, vocab_size: int):
    if kind == "clip":
        return _fast_tokenizer(["<|pad|>", "<|endoftext|>"], vocab_size, 77, "<|pad|>", "<|endoftext|>")
    if kind == "t5":
        return _fast_tokenizer(["<pad>", "</s>", "<unk>"], vocab_size, 512, "<pad>", "</s>")
    return _fast_tokenizer(_QWEN_SPECIALS, vocab_size, 32768, "<|endoftext|>", None)


def tokenizer(kind: str, vocab_size: int):
    """A fresh copy each call, so callers may mutate it without leaking into other pipelines."""
    import copy

    return copy.deepcopy(_tokenizer_cached(kind, vocab_size))


def seeded(seed: int, build):
    """Build a module under a fixed seed without disturbing the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def tiny_vae(spec: TinySpec, shift_factor: float, scaling_factor: float):
    """An AutoencoderKL at toy size with 16 latent channels and 8x downsampling (FLUX.1's and Z-Image's kind), seeded
    with spec.seed + 1; `shift_factor`/`scaling_factor`: the real model's latent normalisation."""
    from diffusers import AutoencoderKL

    return seeded(spec.seed + 1, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=spec.sample_size, use_quant_conv=False,
        use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor))


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Split the head dim over (text, height, width) rope axes like FLUX.1's (16, 56, 56) of 128."""
    if head_dim % 4:
        raise ValueError(f"attention_head_dim must be a multiple of 4 for rope axes, got {head_dim}")
    side = (head_dim * 7 // 16) // 2 * 2
    return (head_dim - 2 * side, side, side)


def tiny_transformer_config(family: str, spec: TinySpec) -> dict:
    """The diffusers config of a tiny transformer: the real architecture at toy width and depth."""
    from pipeline.families import family as get_family

    return get_family(family).tiny_transformer_config(spec)


def build_tiny(model: ModelConfig, transformer=None):
    """The tiny pipeline of `model`'s family; `transformer`, if given, is used instead of the seeded one."""
    from pipeline.families import family as get_family

    return get_family(model.family).build_tiny(model.tiny, transformer)
