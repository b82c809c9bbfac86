"""Everything that runs next to a vLLM engine.

The MARS engine scheduler (vLLM ``scheduler_cls``), the KV connector (swap,
migration, prefill->decode hand-off), the engine deployment, server-side tool
execution, and the local tiny-model builder (`workers.model_builder`).

Nothing here imports `cluster`.
"""
