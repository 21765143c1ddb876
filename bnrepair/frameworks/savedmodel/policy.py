"""Which ops of a saved graph may run on the user's machine without ``--trust-code``.

TensorFlow's own security model says a SavedModel is a program: its graph can read and write files
(``ReadFile``, ``WriteFile``, ``MatchingFiles``), call Python (``PyFunc``), print or dump tensors
(``PrintV2``, ``DebugIdentityV2``) or map memory from a path (``ImmutableConst``). bnrepair runs the graph
only when every node that would run is pure computation: an op TensorFlow's registry declares stateless,
other than the few stateless ones that reach outside the graph, or one of the stateful ops that only read
the model's own variables or draw random numbers. An op the registry does not know (a custom kernel) cannot
be vetted and is refused too.
"""

from __future__ import annotations

from ...errors import InputError

SAFE_STATEFUL = {"VarHandleOp", "ReadVariableOp", "VariableV2", "Variable", "NoOp", "Assert", "RandomUniform",
                 "RandomUniformInt", "RandomStandardNormal", "TruncatedNormal", "RandomShuffle"}
"""Stateful by TensorFlow's definition, yet they touch nothing but the model's own state."""
OUTSIDE_ACCESS = {"ReadFile", "MatchingFiles", "ImmutableConst", "DecodeProtoV2", "IsFile"}
"""Stateless by TensorFlow's definition, yet they read the file system."""


def refusal(op: str) -> str | None:
    """Why ``op`` may not run untrusted, or None when it may."""
    from tensorflow.python.framework import op_def_registry

    definition = op_def_registry.get(op)
    if op in OUTSIDE_ACCESS:
        return "reads the file system"
    if definition is None:
        return "is not a TensorFlow op this installation knows (a custom kernel)"
    if definition.is_stateful and op not in SAFE_STATEFUL:
        return "has side effects (I/O, Python calls or state outside the model)"
    return None


def check_graph(nodes, origin: str, trusted: bool) -> None:
    """Refuse, naming the op and the node, the first node in ``nodes`` that may not run untrusted."""
    if trusted:
        return
    verdicts: dict[str, str | None] = {}
    for node in nodes:
        if node.op not in verdicts:
            verdicts[node.op] = refusal(node.op)
        if verdicts[node.op]:
            raise InputError(f"{origin}: the graph runs {node.op} (node {node.name}), which "
                             f"{verdicts[node.op]}; pass --trust-code only if you trust the model")
