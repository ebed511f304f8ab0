"""The inference layer under ``soulchat.chat`` and ``soulchat.evaluate``: one way to load a trained model,
prompt it as it was trained, fit a conversation into its context window, generate replies, and score
counselor tokens with the training loss. One module per job; this package re-exports their public names.

- Options (``config``): ``InferenceConfig`` and the model section shared by the commands that generate.
- Loading (``loading``, ``load_model``): a local Hugging Face directory only (never downloaded); the
  template is ``--template`` if given, else the one named in the export's training config
  (``soulchat_config.json`` in the model directory, or the run's ``config.json`` next to an ``export``
  directory), else the tokenizer's own chat template ("auto"). One device/dtype picker (``pick_device``,
  ``pick_dtype``).
- Context fitting (``prompts``, ``fit_context``): history that no longer fits loses its oldest
  client/counselor exchanges first; the system prompt is always kept.
- Generation (``generation``: ``generate_batch``, ``generate_replies``): left-padded batches of prompts of
  similar length through transformers' ``generate``; an optional vLLM backend (``VllmGenerator``) when
  ``vllm`` is installed.
- Loss (``loss``, ``packed_loss``): the counselor-token cross-entropy computed exactly as in training, by
  ``soulchat.model.PackedCausalLM`` on packed micro-batches (``soulchat.data.packing.pack`` +
  ``assemble``), each trained token weighted 1, like the trainer's own held-out evaluation.
"""

from soulchat.inference.config import MODEL_SECTION, ON_ERROR_HELP, InferenceConfig, describe_generation
from soulchat.inference.generation import VllmGenerator, generate_batch, generate_replies, length_batches
from soulchat.inference.loading import (
    FALLBACK_CONTEXT,
    TRAINING_CONFIG_FILE,
    LoadedModel,
    load_from_options,
    load_model,
    pick_device,
    pick_dtype,
    read_training_config,
    resolve_template,
    resolve_thinking,
)
from soulchat.inference.loss import packed_loss
from soulchat.inference.prompts import ContextTooLong, check_no_control_tokens, check_text, fit_context

__all__ = [
    "FALLBACK_CONTEXT", "MODEL_SECTION", "ON_ERROR_HELP", "TRAINING_CONFIG_FILE",
    "ContextTooLong", "InferenceConfig", "LoadedModel", "VllmGenerator",
    "check_no_control_tokens", "check_text", "describe_generation", "fit_context", "generate_batch",
    "generate_replies", "length_batches", "load_from_options", "load_model", "packed_loss", "pick_device",
    "pick_dtype", "read_training_config", "resolve_template", "resolve_thinking",
]
