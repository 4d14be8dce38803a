"""``/v1/models``, and what an OpenAI ``model`` field names: a deployment, or a model one deployment serves."""

from __future__ import annotations

import asyncio

from gateway.protocol import ModelCard, ModelList
from gateway.state import GatewayState
from producers.errors import UnknownDeployment
from producers.schemas import DeploymentInfo


async def resolve_model(state: GatewayState, name: str, task: str) -> DeploymentInfo:
    """The live ``task`` deployment that ``name`` names; raises UnknownDeployment (404) otherwise.

    ``name`` is first a deployment name, then a model id that exactly one live
    ``task`` deployment serves.
    """
    client = state.client
    try:
        return await asyncio.to_thread(client.resolve, deployment=name, task=task)
    except UnknownDeployment:
        pass
    try:
        return await asyncio.to_thread(client.resolve, model=name, task=task)
    except UnknownDeployment as error:
        raise UnknownDeployment(f"model {name!r} is neither a live {task} deployment nor a model exactly one "
                                f"such deployment serves ({error})") from None


async def list_models(state: GatewayState) -> ModelList:
    """Every live deployment as an OpenAI model card."""
    infos = await state.client.adeployments()
    return ModelList(data=[
        ModelCard(id=info.name, created=0, root=info.model, task=info.task,
                  quantization=info.construction.quantization_summary if info.construction else None)
        for info in infos])
