"""A Flower Grid that runs the ClientApp in this process, node after node: the server's rounds
and checks tested without Ray's start-up (the Ray simulation has its own test)."""

import copy

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid:
    """Nodes 101, 102, ... with partition ids 0, 1, ...; `stop_at_round`: raise
    KeyboardInterrupt when the server sends that round (a stopped run)."""

    def __init__(self, app, clients: int, stop_at_round: int | None = None,
                 silent: tuple[int, ...] = ()):
        # What a ServerApp process has set when it builds messages (Flower's run and task ids).
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        self.app = app
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i,
                                          node_config={"partition-id": i,
                                                       "num-partitions": clients},
                                          state=RecordDict(), run_config={})
                         for i in range(clients)}
        self.stop_at_round = stop_at_round
        self.silent = silent  # partition ids whose replies never come (past round_timeout)
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            config = msg.content["config"] if "config" in msg.content else {}  # SecAgg+: none
            if self.stop_at_round is not None and config.get("round") == self.stop_at_round:
                raise KeyboardInterrupt
            self.sent.append(msg)
            context = self.contexts[msg.metadata.dst_node_id]
            if config.get("round") and context.node_config["partition-id"] in self.silent:
                continue
            try:
                # A copy, as over the network: SecAgg+'s mod edits the message it receives.
                replies.append(self.app(copy.deepcopy(msg), context))
            except Exception as err:  # as Flower does: the client's error becomes its reply
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=msg))
        return replies
