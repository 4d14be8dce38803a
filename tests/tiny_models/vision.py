"""Tiny random vision models (image classification, VQA, CLIP, detection, ...) built offline."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

#: Side of the square images every tiny vision model works on.
IMAGE_SIZE = 32
#: Patch side for the ViT-style encoders (16 patches per image).
PATCH_SIZE = 8
#: The five labels of the tiny image classifier.
IMAGE_LABELS = ("cat", "dog", "bird", "car", "tree")
#: The answers of the tiny ViLT classifier.
VQA_ANSWERS = ("yes", "no", "two", "red", "cat", "outside")

#: Generation cap saved in the tiny BLIP's generation config.
BLIP_MAX_NEW_TOKENS = 8

_CORPUS = [
    "what is in the picture?",
    "how many cats are there?",
    "is the dog on the sofa?",
    "what colour is the car?",
    "a photo of a cat",
    "a photo of a dog sitting on grass",
    "the bird flies over the tree",
    "yes no two red cat outside",
    "where is the person standing?",
    "there are two birds in the sky",
] * 4

_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

_SMALL_VIT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)


def _wordpiece_vocab(extra_specials: tuple[str, ...] = ()) -> dict[str, int]:
    """Train a lower-cased BERT WordPiece vocab on the small corpus."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=_BERT_SPECIALS + list(extra_specials), show_progress=False
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer.get_vocab()


def _bert_tokenizer(extra_specials: tuple[str, ...] = (), **kwargs):
    from transformers import BertTokenizer

    return BertTokenizer(vocab=_wordpiece_vocab(extra_specials), **kwargs)


def _labels(names) -> dict:
    id2label = dict(enumerate(names))
    return {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _vit_processor():
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_image_classification(directory: Path) -> None:
    """ViT classifier on 32x32 images with five labels."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**_SMALL_VIT, **_labels(IMAGE_LABELS))).eval()
    model.save_pretrained(directory)
    _vit_processor().save_pretrained(directory)


def build_image_feature_extraction(directory: Path) -> None:
    """Bare ViT encoder (with pooler) for image-feature-extraction."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(**_SMALL_VIT)).eval().save_pretrained(directory)
    _vit_processor().save_pretrained(directory)


def build_vqa_vilt(directory: Path) -> None:
    """ViLT answer classifier with a WordPiece tokenizer and small images."""
    from transformers import ViltConfig, ViltForQuestionAnswering, ViltImageProcessorPil, ViltProcessor

    tokenizer = _bert_tokenizer(model_max_length=40)
    torch.manual_seed(0)
    config = ViltConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=40,
        **_SMALL_VIT,
        **_labels(VQA_ANSWERS),
    )
    ViltForQuestionAnswering(config).eval().save_pretrained(directory)
    # ViLT resizes the shorter edge and pads to size_divisor; keep both at the patch grid.
    image_processor = ViltImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, size_divisor=PATCH_SIZE)
    ViltProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def build_vqa_blip(directory: Path) -> None:
    """Generative BLIP VQA model; the text decoder starts from the ``[DEC]`` token."""
    from transformers import (
        BlipConfig,
        BlipForQuestionAnswering,
        BlipImageProcessorPil,
        BlipProcessor,
    )

    tokenizer = _bert_tokenizer(
        extra_specials=("[DEC]",),
        bos_token="[DEC]",
        model_max_length=64,
        model_input_names=["input_ids", "attention_mask"],
    )
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(0)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        encoder_hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        bos_token_id=ids("[DEC]"),
        sep_token_id=ids("[SEP]"),
        eos_token_id=ids("[SEP]"),
        pad_token_id=ids("[PAD]"),
    )
    vision_config = dict(_SMALL_VIT)
    config = BlipConfig(text_config=text_config, vision_config=vision_config, projection_dim=32)
    model = BlipForQuestionAnswering(config).eval()
    # Random weights never emit [SEP]; a short cap keeps generation (and the tests) fast.
    model.generation_config.max_new_tokens = BLIP_MAX_NEW_TOKENS
    model.save_pretrained(directory)
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def _clip_tokenizer():
    import json

    from tokenizers import decoders
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    return CLIPTokenizer(vocab=state["vocab"], merges=merges, model_max_length=77)


def build_zero_shot_image_classification(directory: Path) -> None:
    """Tiny CLIP (text and vision towers) with a byte-level BPE tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    torch.manual_seed(0)
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(text_config=text_config, vision_config=dict(_SMALL_VIT), projection_dim=32)
    CLIPModel(config).eval().save_pretrained(directory)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)


def build_object_detection(directory: Path) -> None:
    """Tiny YOLOS (ViT with detection tokens) with the five image labels."""
    from transformers import YolosConfig, YolosForObjectDetection, YolosImageProcessorPil

    torch.manual_seed(0)
    config = YolosConfig(
        **{**_SMALL_VIT, "image_size": [IMAGE_SIZE, IMAGE_SIZE]},
        num_detection_tokens=5,
        use_mid_position_embeddings=False,
        **_labels(IMAGE_LABELS),
    )
    model = YolosForObjectDetection(config).eval()
    with torch.no_grad():
        # The detection tokens start identical; distinct ones give distinct boxes.
        model.vit.embeddings.detection_tokens.normal_(std=1.0)
    model.save_pretrained(directory)
    YolosImageProcessorPil(size={"shortest_edge": IMAGE_SIZE, "longest_edge": 2 * IMAGE_SIZE}).save_pretrained(
        directory
    )


_SMALL_MIX_TRANSFORMER = dict(
    num_encoder_blocks=2,
    depths=[1, 1],
    sr_ratios=[2, 1],
    hidden_sizes=[16, 32],
    patch_sizes=[7, 3],
    strides=[4, 2],
    num_attention_heads=[1, 2],
    mlp_ratios=[2, 2],
)


def build_image_segmentation(directory: Path) -> None:
    """Tiny SegFormer for semantic segmentation over three labels."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

    torch.manual_seed(0)
    config = SegformerConfig(**_SMALL_MIX_TRANSFORMER, decoder_hidden_size=32, **_labels(IMAGE_LABELS[:3]))
    SegformerForSemanticSegmentation(config).eval().save_pretrained(directory)
    SegformerImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(directory)


def build_depth_estimation(directory: Path) -> None:
    """Tiny GLPN depth estimator."""
    from transformers import GLPNConfig, GLPNForDepthEstimation, GLPNImageProcessorPil

    torch.manual_seed(0)
    config = GLPNConfig(**_SMALL_MIX_TRANSFORMER, decoder_hidden_size=16)
    GLPNForDepthEstimation(config).eval().save_pretrained(directory)
    GLPNImageProcessorPil(size_divisor=IMAGE_SIZE).save_pretrained(directory)


ITT_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
"""The tiny VLM's chat template: each message's images as ``<image>`` placeholders, then its text."""


def build_image_text_to_text(directory: Path) -> None:
    """A LLaVA-style vision-language model: a tiny CLIP vision tower, a projector and a tiny Llama, left-padded.

    Its processor expands each ``<image>`` in the prompt into the image's 9 patch tokens.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        GenerationConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from tests.tiny_models.text import gpt2_tokenizer

    tokenizer = gpt2_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, initializer_range=0.5,
    )
    vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=30, patch_size=10, projection_dim=32)
    config = LlavaConfig(vision_config=vision_config, text_config=text_config,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=10,
                   vision_feature_select_strategy="default", chat_template=ITT_CHAT_TEMPLATE,
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(directory)
