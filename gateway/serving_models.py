"""``/v1/models``, and what an OpenAI ``model`` field names: a deployment, or a model one deployment serves."""

from __future__ import annotations

import asyncio

from gateway.protocol import ModelCard, ModelList
from gateway.state import GatewayState
from producers.errors import UnknownDeployment
from producers.schemas import DeploymentInfo


async def resolve_model(state: GatewayState, name: str, task: str, *more_tasks: str) -> DeploymentInfo:
    """The live deployment of ``task`` (or of one of ``more_tasks``) that ``name`` names; raises
    UnknownDeployment (404) otherwise.

    ``name`` is first a deployment name, then a model id that exactly one live
    deployment of the first task that has one serves.
    """
    client = state.client
    tasks = (task, *more_tasks)
    for key in ("deployment", "model"):
        for each in tasks:
            try:
                return await asyncio.to_thread(client.resolve, **{key: name}, task=each)
            except UnknownDeployment as error:
                last = error
    raise UnknownDeployment(f"model {name!r} is neither a live {' or '.join(tasks)} deployment nor a model exactly "
                            f"one such deployment serves ({last})") from None


async def list_models(state: GatewayState) -> ModelList:
    """Every live deployment as an OpenAI model card."""
    infos = await state.client.adeployments()
    return ModelList(data=[
        ModelCard(id=info.name, created=0, root=info.model, task=info.task,
                  quantization=info.construction.quantization_summary if info.construction else None)
        for info in infos])
