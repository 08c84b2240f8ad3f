"""The IR: values and ops (graph), the op table (ops) and the verifier."""
