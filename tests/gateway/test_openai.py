"""The OpenAI-compatible API through the official ``openai`` package, against a real gateway and fleet.

The oracle is in-process ``transformers.pipeline`` on the same tiny models.
"""

from __future__ import annotations

import base64

import numpy
import openai
import pytest

from tests.gateway.conftest import API_KEY
from tests.oracle import local_pipeline

TEXTS = ["the cat sat on the mat", "a stormy night over the sea and the hills", "hello"]
PROMPTS = ["hello", "the quick brown fox jumps over the lazy dog", "a stormy night"]
CHAT = [{"role": "system", "content": "you are terse."}, {"role": "user", "content": "where does alice live?"}]


@pytest.fixture(scope="module")
def oai(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield client
    client.close()


def pooled(models, text: str) -> numpy.ndarray:
    tokens = numpy.asarray(local_pipeline("feature-extraction", models["gw-emb"])(text), dtype=numpy.float32)[0]
    vector = tokens.mean(axis=0)
    return vector / numpy.linalg.norm(vector)


def generated(models, inputs, **params) -> str:
    pipe = local_pipeline("text-generation", models["gw-gen"])
    return pipe(inputs, do_sample=False, return_full_text=False, **params)[0]["generated_text"]


def test_models_lists_every_live_deployment(oai, models):
    cards = {card.id: card for card in oai.models.list().data}
    assert {"gw-emb", "gw-gen", "gw-slow", "gw-faulty"} <= set(cards)
    assert cards["gw-gen"].owned_by == "pipefleet"


@pytest.mark.parametrize("encoding_format", ["float", "base64", None])
def test_embeddings_equal_in_process_mean_pooled_normalised_vectors(oai, models, encoding_format):
    # Unasked, the SDK requests base64 and decodes it itself; asked for base64, it hands back the string.
    extra = {} if encoding_format is None else {"encoding_format": encoding_format}
    response = oai.embeddings.create(model="gw-emb", input=TEXTS, **extra)
    assert [item.index for item in response.data] == [0, 1, 2]
    for item, text in zip(response.data, TEXTS):
        vector = item.embedding
        if encoding_format == "base64":
            vector = numpy.frombuffer(base64.b64decode(vector), dtype="<f4")
        assert numpy.allclose(numpy.asarray(vector), pooled(models, text), atol=1e-4)
    tokenizer = local_pipeline("feature-extraction", models["gw-emb"]).tokenizer
    expected_tokens = sum(len(tokenizer(text)["input_ids"]) for text in TEXTS)
    assert response.usage.prompt_tokens == expected_tokens == response.usage.total_tokens


def test_embeddings_of_one_string_by_model_id(oai, models):
    response = oai.embeddings.create(model=models["gw-emb"], input=TEXTS[0])
    assert len(response.data) == 1
    assert numpy.allclose(numpy.asarray(response.data[0].embedding), pooled(models, TEXTS[0]), atol=1e-4)


def new_tokens(models, prompt_ids: list[int], max_new_tokens: int) -> tuple[int, str]:
    """How many tokens greedy generate() adds to ``prompt_ids``, and OpenAI's finish reason for it."""
    import torch

    pipe = local_pipeline("text-generation", models["gw-gen"])
    ids = torch.tensor([prompt_ids])
    out = pipe.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pipe.tokenizer.pad_token_id)[0][len(prompt_ids):]
    eos = pipe.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    ended = [i for i, token in enumerate(out.tolist()) if token in eos]
    count = ended[0] + 1 if ended else len(out)
    return count, "stop" if ended else "length"


def test_greedy_completions_equal_the_pipeline(oai, models):
    response = oai.completions.create(model="gw-gen", prompt=PROMPTS, max_tokens=6, temperature=0)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    tokenizer = local_pipeline("text-generation", models["gw-gen"]).tokenizer
    prompt_tokens = completion_tokens = 0
    for choice, prompt in zip(response.choices, PROMPTS):
        assert choice.text == generated(models, prompt, max_new_tokens=6)
        ids = tokenizer(prompt)["input_ids"]
        count, reason = new_tokens(models, ids, 6)
        assert choice.finish_reason == reason
        prompt_tokens += len(ids)
        completion_tokens += count
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert response.usage.total_tokens == prompt_tokens + completion_tokens


def test_greedy_n_gives_n_equal_choices(oai, models):
    response = oai.completions.create(model="gw-gen", prompt=PROMPTS[1], max_tokens=4, temperature=0, n=2)
    expected = generated(models, PROMPTS[1], max_new_tokens=4)
    assert [choice.text for choice in response.choices] == [expected, expected]


def test_greedy_chat_equals_the_pipeline_on_the_chat_template(oai, models):
    response = oai.chat.completions.create(model="gw-gen", messages=CHAT, max_tokens=7, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == generated(models, CHAT, max_new_tokens=7)
    tokenizer = local_pipeline("text-generation", models["gw-gen"]).tokenizer
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    count, reason = new_tokens(models, list(ids), 7)
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), count)
    assert response.choices[0].finish_reason == reason


def test_stop_sequence_cuts_the_text_and_says_stop(oai, models):
    full = generated(models, PROMPTS[1], max_new_tokens=12)
    stop = full.strip()[2:5] if len(full.strip()) > 5 else None
    if not stop:
        pytest.skip(f"the tiny model generated too little text to pick a stop sequence: {full!r}")
    response = oai.completions.create(model="gw-gen", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=stop)
    choice = response.choices[0]
    assert choice.text == full[:full.find(stop)]
    assert choice.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(oai):
    first, second = (oai.completions.create(model="gw-gen", prompt=PROMPTS[0], max_tokens=5, temperature=0.9,
                                            top_p=0.9, seed=7) for _ in range(2))
    assert first.choices[0].text == second.choices[0].text


def test_wrong_key_raises_authentication_error(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="wrong-key-0123456789", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_unsupported_fields_are_refused_by_name(oai):
    with pytest.raises(openai.BadRequestError, match="echo") as caught:
        oai.completions.create(model="gw-gen", prompt="hi", max_tokens=2, echo=True)
    assert caught.value.body["code"] == "UnsupportedField"
    with pytest.raises(openai.BadRequestError, match="tools"):
        oai.chat.completions.create(model="gw-gen", messages=CHAT, max_tokens=2, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model="gw-emb", input="hi", dimensions=8)
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        oai.completions.create(model="gw-gen", prompt="hi", max_tokens=2, extra_body={"frobnicate": True})


def test_neutral_values_of_unsupported_fields_pass(oai, models):
    response = oai.completions.create(model="gw-gen", prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                      presence_penalty=0, frequency_penalty=0, echo=False)
    assert response.choices[0].text == generated(models, PROMPTS[0], max_new_tokens=3)


def test_the_user_field_is_accepted_and_changes_nothing(oai, models):
    response = oai.completions.create(model="gw-gen", prompt=PROMPTS[0], max_tokens=3, temperature=0, user="u-42")
    assert response.choices[0].text == generated(models, PROMPTS[0], max_new_tokens=3)
    chat = oai.chat.completions.create(model="gw-gen", messages=CHAT, max_tokens=3, temperature=0, user="u-42")
    assert chat.choices[0].message.content == generated(models, CHAT, max_new_tokens=3)
    embedded = oai.embeddings.create(model="gw-emb", input=TEXTS[0], user="u-42")
    numpy.testing.assert_allclose(embedded.data[0].embedding, pooled(models, TEXTS[0]), atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="user"):
        oai.completions.create(model="gw-gen", prompt=PROMPTS[0], max_tokens=3, user="u" * 257)


def test_unknown_model_and_wrong_task_are_not_found(oai):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        oai.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        oai.embeddings.create(model="gw-gen", input="hi")


def test_bad_params_are_bad_requests_in_openai_shape(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="gw-gen", prompt="hi", max_tokens=10**7, temperature=0)
    assert caught.value.body["code"] == "InvalidParams"
    assert caught.value.body["type"] == "invalid_request_error"


def test_streamed_completion_chunks_concatenate_to_the_non_streamed_text(oai):
    whole = oai.completions.create(model="gw-gen", prompt=PROMPTS[:2], max_tokens=8, temperature=0)
    texts = {0: "", 1: ""}
    reasons = {}
    chunks = list(oai.completions.create(model="gw-gen", prompt=PROMPTS[:2], max_tokens=8, temperature=0,
                                         stream=True, stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert [texts[0], texts[1]] == [choice.text for choice in whole.choices]
    assert reasons == {choice.index: choice.finish_reason for choice in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_streamed_chat_starts_with_the_role_and_concatenates_to_the_message(oai):
    whole = oai.chat.completions.create(model="gw-gen", messages=CHAT, max_tokens=7, temperature=0)
    stream = oai.chat.completions.create(model="gw-gen", messages=CHAT, max_tokens=7, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.usage is None for chunk in chunks)  # include_usage was not asked for


def test_streamed_stop_sequence_is_held_back_and_cut(oai, models):
    full = generated(models, PROMPTS[1], max_new_tokens=12)
    stop = full.strip()[2:5] if len(full.strip()) > 5 else None
    if not stop:
        pytest.skip(f"the tiny model generated too little text to pick a stop sequence: {full!r}")
    chunks = list(oai.completions.create(model="gw-gen", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                         stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full[:full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_raw_stream_ends_with_done(gateway):
    import httpx

    body = {"model": "gw-gen", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        data = [line for line in response.iter_lines() if line.startswith("data:")]
    assert data[-1] == "data: [DONE]"


# Static and continuous deployments of one tiny Llama: OpenAI calls as users make them.
STATIC, CONTINUOUS = "gw-llama", "gw-llama-cb"


def seeded_pipeline(models, inputs, seed: int, **params) -> str:
    """In-process ``set_seed(seed); pipe(inputs, **params)``'s new text, with the pipeline's own defaults."""
    from transformers import set_seed

    pipe = local_pipeline("text-generation", models[STATIC])
    set_seed(seed)
    return pipe(inputs, return_full_text=False, **params)[0]["generated_text"]


@pytest.mark.parametrize("deployment", [STATIC, CONTINUOUS])
def test_plain_calls_take_the_deployment_defaults(oai, deployment):
    chat = oai.chat.completions.create(model=deployment, messages=CHAT)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens > 0
    completion = oai.completions.create(model=deployment, prompt=PROMPTS[1])
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert 0 < completion.usage.completion_tokens <= 16  # OpenAI's default max_tokens for completions


def test_unsent_fields_sample_as_the_pipeline_does_by_default(oai, models):
    # No temperature, top_p or n: both paths sample with the pipeline's defaults, as pipe(messages) in-process.
    expected = seeded_pipeline(models, CHAT, 3, max_new_tokens=10)
    for deployment in (STATIC, CONTINUOUS):
        chat = oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=10, seed=3)
        assert chat.choices[0].message.content == expected, deployment


def test_temperature_top_p_stop_and_seed_on_both_paths(oai, models):
    params = {"temperature": 0.8, "top_p": 0.9, "seed": 11}
    full = seeded_pipeline(models, PROMPTS[1], 11, max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"no printable stop sequence in the middle of {full!r}")
    for deployment in (STATIC, CONTINUOUS):
        response = oai.completions.create(model=deployment, prompt=PROMPTS[1], max_tokens=16, stop=[stop], **params)
        assert response.choices[0].text == full[:full.find(stop)], deployment
        assert response.choices[0].finish_reason == "stop", deployment
        chat = oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=6, **params)
        assert chat.choices[0].message.content == seeded_pipeline(
            models, CHAT, 11, max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9), deployment


def _first_greedy_token(pipe, prompt: str) -> int:
    encoded = pipe.tokenizer(prompt, return_tensors="pt")
    return int(pipe.model.generate(**encoded, max_new_tokens=1, do_sample=False)[0, -1])


def test_logit_bias_on_both_paths(oai, models):
    pipe = local_pipeline("text-generation", models[STATIC])
    first = _first_greedy_token(pipe, PROMPTS[1])
    greedy = pipe(PROMPTS[1], max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    banned = pipe(PROMPTS[1], max_new_tokens=8, do_sample=False, return_full_text=False,
                  sequence_bias=[[[first], -100.0]])[0]["generated_text"]
    assert banned != greedy
    forced = pipe(CHAT, max_new_tokens=5, do_sample=False, return_full_text=False,
                  sequence_bias=[[[first], 100.0]])[0]["generated_text"]
    assert forced != pipe(CHAT, max_new_tokens=5, do_sample=False, return_full_text=False)[0]["generated_text"]
    for deployment in (STATIC, CONTINUOUS):
        response = oai.completions.create(model=deployment, prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                          logit_bias={str(first): -100})
        assert response.choices[0].text == banned, deployment
        chat = oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=5, temperature=0,
                                           logit_bias={str(first): 100})
        assert chat.choices[0].message.content == forced, deployment


def test_frequency_and_presence_penalties_on_both_paths(oai, models):
    from worker.penalties import OutputTokenPenalty

    pipe = local_pipeline("text-generation", models[STATIC])
    expected = pipe(PROMPTS[1], max_new_tokens=16, do_sample=False, return_full_text=False,
                    logits_processor=[OutputTokenPenalty(1.5, 0.5)])[0]["generated_text"]
    assert expected != pipe(PROMPTS[1], max_new_tokens=16, do_sample=False, return_full_text=False)[0]["generated_text"]
    for deployment in (STATIC, CONTINUOUS):
        response = oai.completions.create(model=deployment, prompt=PROMPTS[1], max_tokens=16, temperature=0,
                                          frequency_penalty=1.5, presence_penalty=0.5)
        assert response.choices[0].text == expected, deployment
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        oai.completions.create(model=STATIC, prompt=PROMPTS[0], max_tokens=3, frequency_penalty=2.5)
    with pytest.raises(openai.BadRequestError, match="presence_penalty.*text-generation"):
        oai.chat.completions.create(model="gw-vlm", max_tokens=3, presence_penalty=0.5, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png_data_url(4)[0]}}]}])


def test_vllm_extra_sampling_params_on_both_paths(oai, models):
    """``top_k``, ``min_p``, ``repetition_penalty`` and ``min_tokens`` as clients written for vLLM send them."""
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.3}
    expected = seeded_pipeline(models, PROMPTS[2], 21, max_new_tokens=12, do_sample=True, temperature=0.9,
                               top_k=5, min_p=0.05, repetition_penalty=1.3)
    assert expected != seeded_pipeline(models, PROMPTS[2], 21, max_new_tokens=12, do_sample=True, temperature=0.9)
    pipe = local_pipeline("text-generation", models[STATIC])
    eos = pipe.model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    held = pipe(PROMPTS[2], max_new_tokens=10, do_sample=False, return_full_text=False, min_new_tokens=4,
                sequence_bias=[[[eos], 100.0]])[0]["generated_text"]
    assert held
    for deployment in (STATIC, CONTINUOUS):
        response = oai.completions.create(model=deployment, prompt=PROMPTS[2], max_tokens=12, temperature=0.9,
                                          seed=21, extra_body=extra)
        assert response.choices[0].text == expected, deployment
        response = oai.completions.create(model=deployment, prompt=PROMPTS[2], max_tokens=10, temperature=0,
                                          logit_bias={str(eos): 100}, extra_body={"min_tokens": 4})
        assert response.choices[0].text == held, deployment
    with pytest.raises(openai.BadRequestError, match="top_k"):
        oai.completions.create(model=STATIC, prompt=PROMPTS[0], max_tokens=3, extra_body={"top_k": -1})


@pytest.mark.parametrize("bias,named", [({"abc": 1}, "logit_bias"), ({"5": 150}, "logit_bias"),
                                        ({str(10**8): 1}, "sequence_bias.*vocabulary")])
def test_bad_logit_bias_is_a_bad_request(oai, bias, named):
    for deployment in (STATIC, CONTINUOUS):
        with pytest.raises(openai.BadRequestError, match=named):
            oai.completions.create(model=deployment, prompt=PROMPTS[0], max_tokens=3, temperature=0,
                                   logit_bias=bias)


def test_n_samples_on_the_continuous_path(oai):
    response = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[0], max_tokens=8, n=3, seed=5)
    again = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[0], max_tokens=8, n=3, seed=5)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == [c.text for c in again.choices]
    assert len({c.text for c in response.choices}) > 1, "three samples came out the same"


def test_openapi_schema_and_docs_sit_behind_the_key(gateway):
    import httpx

    assert httpx.get(f"{gateway.url}/openapi.json", timeout=30).status_code == 401
    assert httpx.get(f"{gateway.url}/docs", timeout=30).status_code == 401
    headers = {"Authorization": f"Bearer {API_KEY}"}
    schema = httpx.get(f"{gateway.url}/openapi.json", headers=headers, timeout=30).json()
    assert schema["openapi"].startswith("3.")
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert chat["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ChatCompletionResponse")
    assert {"/v1/completions", "/v1/embeddings", "/v1/jobs", "/v1/models"} <= set(schema["paths"])
    assert "/openapi.json" not in schema["paths"] and "/docs" not in schema["paths"]
    page = httpx.get(f"{gateway.url}/docs", headers=headers, timeout=30)
    assert page.status_code == 200 and "swagger-ui" in page.text and "/openapi.json" in page.text


def _png_data_url(seed: int) -> tuple[str, "PIL.Image.Image"]:
    import io

    from PIL import Image

    pixels = (numpy.arange(36 * 44 * 3).reshape(36, 44, 3) * (seed + 3) % 251).astype("uint8")
    image = Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode(), image


def test_a_vision_chat_with_an_image_url_part_equals_the_pipeline(oai, models):
    """The vision chat of docs/gateway.md, with a ``data:`` URL (no network here) in place of the https one."""
    url, image = _png_data_url(1)
    messages = [{"role": "system", "content": "you are terse."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "what is in the picture?"}]}]
    response = oai.chat.completions.create(model="gw-vlm", messages=messages, max_tokens=6, temperature=0)
    local = [{"role": "system", "content": [{"type": "text", "text": "you are terse."}]},
             {"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "what is in the picture?"}]}]
    pipe = local_pipeline("image-text-to-text", models["gw-vlm"])
    expected = pipe(local, max_new_tokens=6, return_full_text=False)[0]["generated_text"]
    assert response.choices[0].message.content == expected
    prompt_ids = pipe.processor.apply_chat_template(local, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    assert response.usage.prompt_tokens == len(prompt_ids[0])  # the image's tokens count, as OpenAI counts them
    assert 0 < response.usage.completion_tokens <= 6

    sampled = [oai.chat.completions.create(model="gw-vlm", messages=messages, max_tokens=6, temperature=1.5,
                                           top_p=0.95, seed=seed).choices[0].message.content for seed in (3, 3, 4)]
    assert sampled[0] == sampled[1]  # reproducible by seed
    assert any(text != expected for text in sampled)  # sampled (generate_kwargs), not greedy
    streamed = list(oai.chat.completions.create(model="gw-vlm", messages=messages, max_tokens=6, temperature=0,
                                                stream=True))
    pieces = [chunk.choices[0].delta.content for chunk in streamed if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(pieces) == expected and len(pieces) > 1  # token by token, not one whole chunk


def test_logit_bias_on_a_vision_chat_goes_where_the_pipeline_reads_it(oai, models):
    url, image = _png_data_url(3)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "describe it"}]}]
    local = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "describe it"}]}]
    pipe = local_pipeline("image-text-to-text", models["gw-vlm"])
    greedy = pipe(local, max_new_tokens=5, return_full_text=False)[0]["generated_text"]
    first = pipe.processor.tokenizer(greedy, add_special_tokens=False)["input_ids"][0]
    expected = pipe(local, max_new_tokens=5, return_full_text=False,
                    generate_kwargs={"sequence_bias": [[[first], -100.0]]})[0]["generated_text"]
    assert expected != greedy
    response = oai.chat.completions.create(model="gw-vlm", messages=messages, max_tokens=5, temperature=0,
                                           logit_bias={str(first): -100})
    assert response.choices[0].message.content == expected


def test_image_parts_to_a_text_only_deployment_and_resolution_hints_are_refused_by_name(oai):
    url, _ = _png_data_url(2)
    with pytest.raises(openai.BadRequestError, match="image-text-to-text"):
        oai.chat.completions.create(model="gw-gen", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "hi"}]}])
    with pytest.raises(openai.BadRequestError, match="detail"):
        oai.chat.completions.create(model="gw-vlm", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "high"}}]}])
    answer = oai.chat.completions.create(model="gw-vlm", max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "auto"}}]}])
    assert answer.choices[0].message.content is not None


def raw_logprobs(models, prompt_ids: list[int], max_new_tokens: int, top: int) -> list[tuple[int, float, dict]]:
    """In-process greedy ``generate(output_logits=True)``: each new token, its raw log-softmax and the ``top``
    best of its step as ``{token text: logprob}``."""
    import torch

    pipe = local_pipeline("text-generation", models[STATIC])
    ids = torch.tensor([prompt_ids])
    out = pipe.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, output_logits=True, return_dict_in_generate=True)
    entries = []
    for token, logits in zip(out.sequences[0, len(prompt_ids):].tolist(), out.logits):
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        values, best = torch.topk(logprobs, top)
        entries.append((token, float(logprobs[token]),
                        {pipe.tokenizer.decode([i]): v for i, v in zip(best.tolist(), values.tolist())}))
    return entries


def test_completion_logprobs_equal_generates_raw_log_softmax(oai, models):
    pipe = local_pipeline("text-generation", models[STATIC])
    expected = raw_logprobs(models, pipe.tokenizer(PROMPTS[1])["input_ids"], 8, 3)
    response = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3)
    logprobs = response.choices[0].logprobs
    assert logprobs.tokens == [pipe.tokenizer.decode([token]) for token, _, _ in expected]
    assert logprobs.token_logprobs == pytest.approx([logprob for _, logprob, _ in expected], abs=1e-4)
    for got, (_, _, top) in zip(logprobs.top_logprobs, expected):
        assert got == pytest.approx(top, abs=1e-4)
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))]
    plain = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert response.choices[0].text == plain.choices[0].text and plain.choices[0].logprobs is None


@pytest.mark.parametrize("deployment", [CONTINUOUS, STATIC])
def test_chat_logprobs_streamed_and_not_equal_generates(oai, models, deployment):
    """Logprobs of a chat, streamed and not, on both paths."""
    pipe = local_pipeline("text-generation", models[STATIC])
    prompt_ids = pipe.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]
    expected = raw_logprobs(models, list(prompt_ids), 6, 2)
    response = oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert [entry.logprob for entry in content] == pytest.approx([lp for _, lp, _ in expected], abs=1e-4)
    for entry, (token, _, top) in zip(content, expected):
        assert entry.token == pipe.tokenizer.decode([token])
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert {alt.token: alt.logprob for alt in entry.top_logprobs} == pytest.approx(top, abs=1e-4)
    chunks = list(oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=6, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True))
    streamed = [entry for chunk in chunks for choice in chunk.choices if choice.logprobs
                for entry in choice.logprobs.content]
    assert streamed == content
    assert "".join(choice.delta.content or "" for chunk in chunks for choice in chunk.choices) == \
        response.choices[0].message.content


def test_logprobs_stop_at_a_stop_sequence_on_both_paths_and_are_refused_where_not_served(oai):
    full = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[1], max_tokens=16, temperature=0, logprobs=0)
    text = full.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip(f"no printable stop sequence in the middle of {text!r}")
    cut = oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[1], max_tokens=16, temperature=0, logprobs=0,
                                 stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
    tokens = cut.logprobs.tokens
    assert tokens == full.choices[0].logprobs.tokens[:len(tokens)]
    assert len("".join(tokens[:-1])) < len(cut.text) <= len("".join(tokens))
    static = oai.completions.create(model=STATIC, prompt=PROMPTS[1], max_tokens=16, temperature=0, logprobs=0,
                                    stop=[stop]).choices[0]
    assert static.text == cut.text and static.logprobs.tokens == tokens
    assert static.logprobs.token_logprobs == pytest.approx(cut.logprobs.token_logprobs, abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="logprobs.*text-generation"):
        oai.chat.completions.create(model="gw-vlm", messages=CHAT, max_tokens=4, logprobs=True)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        oai.chat.completions.create(model=CONTINUOUS, messages=CHAT, max_tokens=4, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oai.completions.create(model=CONTINUOUS, prompt=PROMPTS[1], max_tokens=4, logprobs=21)


@pytest.mark.parametrize("deployment", [STATIC, CONTINUOUS])
def test_each_sampled_choice_has_the_logprobs_of_its_own_tokens(oai, deployment):
    response = oai.chat.completions.create(model=deployment, messages=CHAT, max_tokens=8, temperature=1.0, n=3,
                                           seed=7, logprobs=True, top_logprobs=1)
    contents = [choice.message.content for choice in response.choices]
    assert len(set(contents)) > 1, f"the samples did not differ: {contents}"
    assert sum(len(choice.logprobs.content) for choice in response.choices) == response.usage.completion_tokens
    for choice in response.choices:
        entries = choice.logprobs.content
        if not any("\ufffd" in entry.token for entry in entries):  # a byte piece alone decodes to U+FFFD
            assert "".join(entry.token for entry in entries) == choice.message.content
        for entry in entries:  # the taken token is never likelier than the step's best
            assert entry.logprob <= entry.top_logprobs[0].logprob + 1e-6
