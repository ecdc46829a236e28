"""The Flower ClientApp that runs on edge devices.

``train``: load the global weights, train on the node's private data, reply with the model's
weights (an ArrayRecord) and scalar metrics (a MetricRecord) — nothing else leaves the device:
no images, no labels, no per-class counts. Only when the server asks (``diversity-stats``), the
reply adds the ``diversity`` MetricRecord of :mod:`common.diversity`: per-class image counts and
K-means curves of the device's data embedded by the global model it received (numbers only; the
README says what they reveal). ``evaluate``: accuracy on the node's held-out data. Record names and
metric keys are the contract of :mod:`common.replies`, which the server enforces.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common import diversity, replies
from common.faults import fault_point
from common.models import build_model
from common.runtime import derive_seed, make_generator
from common.training import evaluate_model, train_local
from edge_client.task import ClientTaskConfig, node_data

app = ClientApp()


def _model_from(msg: Message, task: ClientTaskConfig, info) -> torch.nn.Module:
    model = build_model(task.model, info.channels, info.num_classes, info.image_size)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = ClientTaskConfig.from_record(msg.content["config"])
    data = node_data(context.node_config, task)
    model = _model_from(msg, task, data.dataset.info)
    config = msg.content["config"]
    # a resumed federation restarts Flower's round counter; the offset keeps the global round
    server_round = int(config.get("server-round", 0)) + int(config.get("round-offset", 0))
    fault_point("client-train", str(server_round))
    # a simulated node's identity is its partition (node ids are random per run), so runs repeat
    who = context.node_config.get("partition-id", context.node_id)
    generator = make_generator(derive_seed("client", task.seed, server_round, who))
    torch.manual_seed(derive_seed("client-torch", task.seed, server_round, who))
    stats = _diversity_record(model, data, task) if task.diversity_stats else None
    metrics = train_local(model, data.train.images, data.train.labels, task.local_train(), generator)
    reply = train_reply(model.state_dict(), metrics, len(data.train))
    if stats is not None:
        reply[diversity.RECORD_NAME] = MetricRecord(stats)
    return Message(content=reply, reply_to=msg)


def train_reply(state: dict[str, torch.Tensor], metrics: dict[str, float], examples: int) -> RecordDict:
    """The records of a train reply (:mod:`common.replies`): the weights, the metrics and the example count."""
    return RecordDict(
        {
            replies.ARRAYS: ArrayRecord(state),
            replies.METRICS: MetricRecord({**metrics, replies.EXAMPLES: examples}),
        }
    )


def _diversity_record(model: torch.nn.Module, data, task: ClientTaskConfig) -> dict:
    """Per-class K-means statistics of the private data under the received global model."""
    features = diversity.embed(model, data.train.images)
    stats = diversity.statistics_per_class(
        features, data.train.labels, data.dataset.info.num_classes, task.diversity_k_max, task.seed
    )
    return diversity.to_record(stats)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    task = ClientTaskConfig.from_record(msg.content["config"])
    data = node_data(context.node_config, task)
    model = _model_from(msg, task, data.dataset.info)
    loss, accuracy = evaluate_model(model, data.holdout.images, data.holdout.labels)
    eval_loss, eval_accuracy = replies.EVAL_METRICS
    metrics = {eval_loss: loss, eval_accuracy: accuracy, replies.EXAMPLES: max(1, len(data.holdout))}
    return Message(content=RecordDict({replies.METRICS: MetricRecord(metrics)}), reply_to=msg)
