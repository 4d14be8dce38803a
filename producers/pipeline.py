"""``producers.pipeline(...)``: a stand-in for ``transformers.pipeline`` that runs on the fleet.

    pipe = pipeline("text-classification", model="distilbert/...")
    pipe("I love this")                       # same output as in-process
    pipe(["good", "bad"], batch_size=2)
    pipeline("text-generation", model=m, dtype=torch.bfloat16, device=0)  # checked against the deployment
    for out in pipe(texts_generator()): ...  # streamed, bounded in flight
"""

from __future__ import annotations

import types
from typing import Any, AsyncIterator, Iterable, Iterator

from producers.client import FleetClient
from producers.construction import name_or_path, split_construction
from producers.errors import UnknownDeployment
from producers.job import Job

DEFAULT_TIMEOUT_S = 600.0
"""How long a blocking call waits for its result by default."""


def _is_stream(inputs: Any) -> bool:
    if isinstance(inputs, (types.GeneratorType, Iterator)):
        return True
    kind = type(inputs)
    return kind.__module__.startswith("datasets") or kind.__name__ in ("KeyDataset", "Dataset", "IterableDataset")


class FleetPipeline:
    """Called like a transformers Pipeline; every call is a job on the fleet.

    Construction options of ``transformers.pipeline`` (``device``, ``dtype``,
    ``model_kwargs``, ``batch_size``, ...) are matched against the live
    deployments at construction; see :mod:`producers.construction`. Other
    keyword arguments become default call params, as in-process.
    """

    def __init__(self, task: str | None = None, model: Any = None, *, client: FleetClient | None = None,
                 deployment: str | None = None, revision: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 **kwargs: Any) -> None:
        self.client = client or FleetClient.from_env()
        construction, default_params = split_construction(model, kwargs)
        model = name_or_path(model)
        # A deployment without a revision serves the default branch, which in-process calls "main".
        lookup = None if revision == "main" else revision
        self.info = self.client.resolve(task=task, model=model, deployment=deployment, revision=lookup,
                                        construction=construction)
        if revision == "main" and self.info.revision not in (None, "main"):
            raise UnknownDeployment(f"deployment {self.info.name!r} serves revision {self.info.revision!r}, "
                                    "not 'main'")
        self.task = self.info.task
        self.model = model or self.info.model
        self.revision = self.info.revision if revision is not None else None
        self.timeout_s = timeout_s
        self.batch_size = construction.batch_size
        self.default_params = default_params

    def __repr__(self) -> str:
        return f"FleetPipeline(task={self.task!r}, deployment={self.info.name!r})"

    def _params(self, params: dict[str, Any]) -> dict[str, Any]:
        merged = {**self.default_params, **params}
        for local_only in ("batch_size", "num_workers"):  # the fleet batches by itself
            merged.pop(local_only, None)
        return merged

    @staticmethod
    def _gather_kwargs_input(inputs: Any, params: dict[str, Any], task: str) -> Any:
        # In-process pipelines also accept their input as keywords (QA: question=, context=; VQA: image=, question=).
        if inputs is not None:
            return inputs
        if task == "image-text-to-text" and "text" in params:
            # pipe(text=chat), or pipe(images=image, text=prompt) for one prompt.
            images, text = params.pop("images", None), params.pop("text")
            if images is None:
                return text
            if isinstance(text, list):
                raise TypeError("image-text-to-text: pass several prompts as a list of {'images', 'text'} dicts")
            return {"images": images, "text": text}
        keys = {"question-answering": ("question", "context"), "visual-question-answering": ("image", "question"),
                "document-question-answering": ("image", "question")}.get(task, ())
        if keys and all(k in params for k in keys):
            values = [params.pop(k) for k in keys]
            if isinstance(values[0], list):
                return [dict(zip(keys, row)) for row in zip(*values)]
            return dict(zip(keys, values))
        raise TypeError(f"{task} pipeline needs inputs")

    def submit(self, inputs: Any = None, *, priority: int | None = None, timeout_s: float | None = None,
               chunk_size: int | None = None, partial: bool = False, stream: bool = False, **params: Any) -> Job:
        """Enqueue one call without waiting; returns its :class:`Job` (``stream``: see ``FleetClient.submit``)."""
        inputs = self._gather_kwargs_input(inputs, params, self.task)
        return self.client.submit(inputs=inputs, params=self._params(params), deployment=self.info.name,
                                  model=self.model, revision=self.revision, priority=priority, timeout_s=timeout_s,
                                  chunk_size=chunk_size, partial=partial, stream=stream)

    def __call__(self, inputs: Any = None, *args: Any, batch_size: int | None = None, **params: Any) -> Any:
        """Run ``inputs`` on the fleet and return what ``transformers.pipeline`` would."""
        if args:  # positional extras, e.g. zero-shot's candidate_labels
            if self.task == "zero-shot-classification" and "candidate_labels" not in params:
                params["candidate_labels"] = args[0]
            else:
                raise TypeError(f"unexpected positional arguments {args!r}")
        batch_size = batch_size or self.batch_size
        if inputs is not None and _is_stream(inputs):
            return self.client.map(inputs, deployment=self.info.name, params=self._params(params),
                                   chunk_size=batch_size or None)
        job = self.submit(inputs, **params)
        return job.result(timeout=self.timeout_s)

    def stream(self, inputs: Any = None, *, priority: int | None = None, **params: Any) -> Iterator[str]:
        """Run one prompt (text or chat) and yield its generated text in pieces as they come.

        The pieces concatenated equal ``pipe(inputs, return_full_text=False, **params)``'s
        ``generated_text``; the job's error is raised if it fails.
        """
        job = self.submit(inputs, priority=priority, timeout_s=None, stream=True, **params)
        return job.stream(timeout_s=self.timeout_s)

    async def astream(self, inputs: Any = None, *, priority: int | None = None,
                      **params: Any) -> AsyncIterator[str]:
        """Async :meth:`stream`."""
        job = await self.client.asubmit(inputs=self._gather_kwargs_input(inputs, params, self.task),
                                        params=self._params(params), deployment=self.info.name, model=self.model,
                                        revision=self.revision, priority=priority, stream=True)
        async for piece in job.astream(timeout_s=self.timeout_s):
            yield piece

    def map(self, iterable: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        """Stream ``iterable`` through the fleet; see :meth:`FleetClient.map`."""
        return self.client.map(iterable, deployment=self.info.name, **kwargs)


def pipeline(task: str | None = None, model: Any = None, *, client: FleetClient | None = None,
             **kwargs: Any) -> FleetPipeline:
    """Like ``transformers.pipeline(task, model=..., **options)``, but every call runs on the fleet.

    Takes every construction option ``transformers.pipeline`` takes; one the live
    deployments were not built with (another dtype, a quantization config,
    ``trust_remote_code=True``) raises :class:`UnknownDeployment` naming what they serve.
    """
    return FleetPipeline(task, model, client=client, **kwargs)
