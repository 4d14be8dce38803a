"""Tiny random audio models (wav2vec2 CTC, Whisper, audio classification) built offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

logger = logging.getLogger(__name__)

#: Sampling rate of every tiny audio model.
SAMPLING_RATE = 16_000
#: Samples per CTC logit of the tiny wav2vec2 (the product of its conv strides), as in the real model.
CTC_INPUTS_TO_LOGITS_RATIO = 320
#: Labels of the tiny audio classifier.
AUDIO_LABELS = ("speech", "music", "noise")
#: Generation cap saved in the tiny Whisper's generation config (prompt tokens included).
WHISPER_MAX_LENGTH = 20
#: Whisper's time step between two timestamp tokens, in seconds.
WHISPER_TIME_PRECISION = 0.02
#: Whisper's window, in seconds; the timestamp tokens run from 0 to this.
WHISPER_CHUNK_LENGTH_S = 30

_CHARS = "abcdefghijklmnopqrstuvwxyz'"
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny whisper model",
    "speech recognition with random weights makes garbage",
    "one two three four five six seven eight nine ten",
] * 4

_SMALL_WAV2VEC2 = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    conv_dim=(32, 32, 32),
    conv_stride=(5, 8, 8),
    conv_kernel=(10, 8, 8),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    # The "large-lv60" layout: it takes an attention mask, so padding in a batch does not change outputs.
    feat_extract_norm="layer",
    do_stable_layer_norm=True,
    mask_time_prob=0.0,
)


def _wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLING_RATE,
        padding_value=0.0,
        do_normalize=True,
        return_attention_mask=True,
    )


def build_asr_ctc(directory: Path) -> None:
    """wav2vec2 CTC model with a character vocab and ``|`` as word delimiter."""
    from transformers import Wav2Vec2Config, Wav2Vec2CTCTokenizer, Wav2Vec2ForCTC

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}
    vocab.update({char: 5 + index for index, char in enumerate(_CHARS)})
    vocab_file = Path(directory) / "vocab.json"
    vocab_file.write_text(json.dumps(vocab))
    tokenizer = Wav2Vec2CTCTokenizer(str(vocab_file), word_delimiter_token="|")

    torch.manual_seed(0)
    config = Wav2Vec2Config(
        **_SMALL_WAV2VEC2, vocab_size=len(vocab), pad_token_id=vocab["<pad>"], ctc_loss_reduction="mean"
    )
    assert config.inputs_to_logits_ratio == CTC_INPUTS_TO_LOGITS_RATIO
    model = Wav2Vec2ForCTC(config).eval()
    with torch.no_grad():
        # Random logits would emit <s>/</s> and few delimiters; this yields short words, like speech.
        model.lm_head.bias[[vocab["<s>"], vocab["</s>"], vocab["<unk>"]]] = -100.0
        model.lm_head.bias[vocab["|"]] += 0.15
        model.lm_head.bias[vocab["<pad>"]] += 0.15
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _wav2vec2_feature_extractor().save_pretrained(directory)


def build_audio_classification(directory: Path) -> None:
    """wav2vec2 sequence classifier with three labels."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    id2label = dict(enumerate(AUDIO_LABELS))
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        **_SMALL_WAV2VEC2,
        classifier_proj_size=16,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    Wav2Vec2ForSequenceClassification(config).eval().save_pretrained(directory)
    _wav2vec2_feature_extractor().save_pretrained(directory)


def _whisper_specials() -> list[str]:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    # The order is Whisper's: the tokenizer finds a language token at <|startoftranscript|> + 1 + index.
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in LANGUAGES),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
    ]


def _whisper_tokenizer():
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    model_state = json.loads(bpe.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model_state["merges"]]
    tokenizer = WhisperTokenizer(
        vocab=model_state["vocab"], merges=merges, pad_token="<|endoftext|>", model_max_length=448
    )
    specials = [AddedToken(token, special=True, normalized=False) for token in _whisper_specials()]
    tokenizer.add_tokens(specials, special_tokens=True)
    steps = int(WHISPER_CHUNK_LENGTH_S / WHISPER_TIME_PRECISION)
    # Timestamps are ordinary added tokens: Whisper's decoder tells them apart by id, not as specials.
    timestamps = [
        AddedToken(f"<|{step * WHISPER_TIME_PRECISION:.2f}|>", special=False, normalized=False)
        for step in range(steps + 1)
    ]
    tokenizer.add_tokens(timestamps)
    tokenizer.add_special_tokens({"additional_special_tokens": _whisper_specials()[1:]})
    return tokenizer


def build_asr_whisper(directory: Path) -> None:
    """Whisper with Whisper's special and timestamp tokens, alignment heads and a short generation cap."""
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    tokenizer = _whisper_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    end_of_text = ids("<|endoftext|>")
    start_of_transcript = ids("<|startoftranscript|>")
    space = tokenizer.encode(" ", add_special_tokens=False)[0]
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(tokenizer),
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=end_of_text,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        decoder_start_token_id=start_of_transcript,
        suppress_tokens=[],
        begin_suppress_tokens=[space, end_of_text],
    )
    model = WhisperForConditionalGeneration(config).eval()
    specials = _whisper_specials()
    languages = [token for token in specials[2:] if token not in specials[-6:]]
    model.generation_config = GenerationConfig(
        decoder_start_token_id=start_of_transcript,
        bos_token_id=end_of_text,
        eos_token_id=end_of_text,
        pad_token_id=end_of_text,
        max_length=WHISPER_MAX_LENGTH,
        is_multilingual=True,
        lang_to_id={token: ids(token) for token in languages},
        task_to_id={"transcribe": ids("<|transcribe|>"), "translate": ids("<|translate|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"),
        prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50,
        begin_suppress_tokens=[space, end_of_text],
        suppress_tokens=[],
        return_timestamps=False,
        alignment_heads=[[1, 0], [1, 1], [1, 2], [1, 3]],
    )
    model.save_pretrained(directory)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=80, sampling_rate=SAMPLING_RATE, chunk_length=WHISPER_CHUNK_LENGTH_S
    )
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(directory)
