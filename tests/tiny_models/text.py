"""Tiny random text models (BERT, GPT-2, T5 families) built offline with in-process tokenizers."""

from __future__ import annotations

import functools
import logging
import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

#: Longest input the tiny tokenizers accept before truncation.
MODEL_MAX_LENGTH = 128
#: Short limit of the QA tokenizer, so that long contexts are split with ``doc_stride``.
QA_MODEL_MAX_LENGTH = 64
#: Labels of the tiny sentiment classifier.
SENTIMENT_LABELS = ("NEGATIVE", "POSITIVE")
#: Labels of the tiny named-entity tagger (B-/I- scheme).
NER_LABELS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
#: Labels of the tiny NLI model behind zero-shot classification.
NLI_LABELS = ("entailment", "neutral", "contradiction")
#: Token budget of the tiny summarizer's default generation.
SUMMARY_MAX_LENGTH = 16

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# T5 expects pad=0 (also the decoder start), eos=1, unk=2.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_GPT2_SPECIALS = ("<|endoftext|>", "<|pad|>")
_GPT2_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# Small on purpose: rarer words then split into ``##`` pieces, which the NER aggregation tests need.
_WORDPIECE_VOCAB_SIZE = 400
_BPE_VOCAB_SIZE = 600

_NAMES = ("alice", "bob", "carol", "david", "emma", "frank", "grace", "henry", "isabel", "jack", "karen", "liam")
_PLACES = ("paris", "london", "berlin", "madrid", "rome", "tokyo", "cairo", "lima", "oslo", "vienna", "dublin")
_JOBS = ("teacher", "doctor", "baker", "pilot", "engineer", "painter", "farmer", "writer")
_NOUNS = ("film", "book", "meal", "concert", "hotel", "museum", "garden", "train", "market", "bridge")
_GOOD = ("good", "great", "wonderful", "lovely", "excellent", "pleasant")
_BAD = ("bad", "terrible", "awful", "boring", "dreadful", "disappointing")
_TIMES = ("monday", "tuesday", "summer", "winter", "morning", "evening", "year", "week")
_TEMPLATES = (
    "{name} lives in {place} and works as a {job}.",
    "the {noun} in {place} was {good}.",
    "the {noun} in {place} was {bad}.",
    "{name} visited {place} last {time} with {name2}.",
    "what did {name} think of the {noun}?",
    "i think the {noun} was {good}, but {name} found it {bad}.",
    "where does {name} live? {name} lives in {place}.",
    "this {noun} is about a {job} from {place}.",
    "{name} and {name2} met in {place} on a {good} {time}.",
    "nobody liked the {bad} {noun} near {place}.",
)


@functools.cache
def corpus(n_sentences: int = 400) -> tuple[str, ...]:
    """A deterministic English corpus of short generated sentences."""
    rng = random.Random(0)
    sentences = []
    for _ in range(n_sentences):
        template = rng.choice(_TEMPLATES)
        sentences.append(
            template.format(
                name=rng.choice(_NAMES),
                name2=rng.choice(_NAMES),
                place=rng.choice(_PLACES),
                job=rng.choice(_JOBS),
                noun=rng.choice(_NOUNS),
                good=rng.choice(_GOOD),
                bad=rng.choice(_BAD),
                time=rng.choice(_TIMES),
            )
        )
    # Every letter and digit also appears inside a word, so that unseen words split into ``##`` pieces
    # instead of collapsing to the unknown token.
    sentences.append(" ".join("x" + char for char in string.ascii_lowercase + string.digits))
    return tuple(sentences)


@functools.cache
def _trained_wordpiece(special_tokens: tuple[str, ...], unk_token: str) -> str:
    """Train a lower-cased WordPiece tokenizer (``##`` continuations) and return it serialized."""
    tokenizer = Tokenizer(models.WordPiece(unk_token=unk_token))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(
        vocab_size=_WORDPIECE_VOCAB_SIZE, special_tokens=list(special_tokens), show_progress=False
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer.to_str()


@functools.cache
def _trained_byte_bpe(special_tokens: tuple[str, ...]) -> str:
    """Train a GPT-2-style byte-level BPE tokenizer and return it serialized."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return tokenizer.to_str()


def _wrap(tokenizer: Tokenizer, *, model_max_length: int = MODEL_MAX_LENGTH, padding_side: str = "right", **special):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=model_max_length,
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
        **special,
    )


def bert_tokenizer(*, model_max_length: int = MODEL_MAX_LENGTH):
    """A BERT-style WordPiece tokenizer: ``[CLS] A [SEP] B [SEP]`` with segment ids."""
    tokenizer = Tokenizer.from_str(_trained_wordpiece(_BERT_SPECIALS, "[UNK]"))
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return _wrap(
        tokenizer,
        model_max_length=model_max_length,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        # transformers 5's generic fast tokenizer leaves segment ids out of its model inputs; BERT uses them.
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def t5_tokenizer():
    """A WordPiece tokenizer laid out like T5's: pad=0, eos=1 appended, unk=2."""
    tokenizer = Tokenizer.from_str(_trained_wordpiece(_T5_SPECIALS, "<unk>"))
    eos_id = tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=[("</s>", eos_id)]
    )
    return _wrap(tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def gpt2_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer, left-padded with its own pad token and a chat template."""
    tokenizer = Tokenizer.from_str(_trained_byte_bpe(_GPT2_SPECIALS))
    wrapped = _wrap(
        tokenizer,
        padding_side="left",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    wrapped.chat_template = _GPT2_CHAT_TEMPLATE
    return wrapped


def _bert_config(tokenizer, **overrides):
    from transformers import BertConfig

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=MODEL_MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        # Wider than BERT's 0.02 so that random logits are far from uniform and argmaxes are not near-ties.
        initializer_range=0.2,
    )
    settings.update(overrides)
    return BertConfig(**settings)


def _labels(names: tuple[str, ...]) -> dict:
    return {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}}


def _save(model_class, config, tokenizer, directory: Path, generation_config=None) -> None:
    torch.manual_seed(0)
    model = model_class(config).eval()
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.debug("built tiny %s into %s", model_class.__name__, directory)


def build_text_classification(directory: Path) -> None:
    """BERT sequence classifier with labels NEGATIVE / POSITIVE."""
    from transformers import BertForSequenceClassification

    tokenizer = bert_tokenizer()
    config = _bert_config(tokenizer, **_labels(SENTIMENT_LABELS))
    _save(BertForSequenceClassification, config, tokenizer, directory)


#: Sizes that bitsandbytes' 4-bit CPU kernels take: on a CPU with AVX512-BF16, bitsandbytes repacks every 4-bit
#: Linear into blocks of 32 output rows by 64 input columns (``_convert_weight_packed_for_cpu``) and fails on a
#: layer narrower than that (``shape '[32, 0]' is invalid``). Elsewhere any size works, so the suite must use these.
BNB_4BIT_WIDTH = {"hidden_size": 64, "intermediate_size": 128}


def build_text_classification_wide(directory: Path) -> None:
    """The BERT sentiment classifier of :func:`build_text_classification`, wide enough for 4-bit CPU kernels."""
    from transformers import BertForSequenceClassification

    tokenizer = bert_tokenizer()
    # Half the narrow model's initializer range keeps activations under LLM.int8's outlier threshold (6.0), so
    # 8-bit outputs do not depend on which inputs share a batch.
    config = _bert_config(tokenizer, **BNB_4BIT_WIDTH, initializer_range=0.1, **_labels(SENTIMENT_LABELS))
    _save(BertForSequenceClassification, config, tokenizer, directory)


def build_text_generation(directory: Path) -> None:
    """GPT-2 causal LM whose tokenizer pads on the left."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=MODEL_MAX_LENGTH,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save(GPT2LMHeadModel, config, tokenizer, directory, generation_config)


def build_llama_generation(directory: Path, **sizes: int) -> None:
    """Llama causal LM (the architecture transformers' continuous batching engine serves), left-padded."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = gpt2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=sizes.get("hidden_size", 32),
        intermediate_size=sizes.get("intermediate_size", 64),
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Wide random logits: greedy argmaxes are then far from float-noise ties between engines.
        initializer_range=0.5,
    )
    generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _save(LlamaForCausalLM, config, tokenizer, directory, generation_config)


def build_llama_generation_wide(directory: Path) -> None:
    """The Llama of :func:`build_llama_generation`, wide enough for 4-bit CPU kernels (:data:`BNB_4BIT_WIDTH`)."""
    build_llama_generation(directory, **BNB_4BIT_WIDTH)


def build_feature_extraction(directory: Path) -> None:
    """Plain BERT encoder."""
    from transformers import BertModel

    tokenizer = bert_tokenizer()
    _save(BertModel, _bert_config(tokenizer), tokenizer, directory)


def build_token_classification(directory: Path) -> None:
    """BERT token classifier with labels O, B-PER, I-PER, B-LOC, I-LOC."""
    from transformers import BertForTokenClassification

    tokenizer = bert_tokenizer()
    config = _bert_config(tokenizer, **_labels(NER_LABELS))
    _save(BertForTokenClassification, config, tokenizer, directory)


def build_fill_mask(directory: Path) -> None:
    """BERT masked LM; the mask token is ``[MASK]``."""
    from transformers import BertForMaskedLM

    tokenizer = bert_tokenizer()
    _save(BertForMaskedLM, _bert_config(tokenizer), tokenizer, directory)


def build_zero_shot(directory: Path) -> None:
    """BERT NLI classifier (entailment / neutral / contradiction) for zero-shot classification."""
    from transformers import BertForSequenceClassification

    tokenizer = bert_tokenizer()
    config = _bert_config(tokenizer, **_labels(NLI_LABELS))
    _save(BertForSequenceClassification, config, tokenizer, directory)


def build_summarization(directory: Path) -> None:
    """T5 seq2seq model whose default generation stops at :data:`SUMMARY_MAX_LENGTH` tokens."""
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    tokenizer = t5_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        # With tied embeddings and the default init, greedy decoding emits only padding; this makes the
        # random model produce varied tokens, so generation tests compare something.
        tie_word_embeddings=False,
        initializer_factor=3.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    generation_config = GenerationConfig(
        decoder_start_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_length=SUMMARY_MAX_LENGTH,
    )
    _save(T5ForConditionalGeneration, config, tokenizer, directory, generation_config)


def build_question_answering(directory: Path) -> None:
    """BERT extractive QA model; its tokenizer stops at :data:`QA_MODEL_MAX_LENGTH` tokens."""
    from transformers import BertForQuestionAnswering

    tokenizer = bert_tokenizer(model_max_length=QA_MODEL_MAX_LENGTH)
    _save(BertForQuestionAnswering, _bert_config(tokenizer), tokenizer, directory)


def numbered_texts(n: int) -> list[str]:
    """``n`` distinct sentences from the corpus, each ending in its index."""
    sentences = corpus()
    return [f"{sentences[i % len(sentences)]} {i}" for i in range(n)]
