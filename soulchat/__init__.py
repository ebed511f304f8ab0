"""soulchat: fine-tune language models into empathetic counselors on packed multi-turn conversations."""

__version__ = "0.1.0"

# The options load first: soulchat.lora defines its section with soulchat.config's helpers, and
# soulchat.config lists that section, so importing soulchat.lora first must find config complete.
from soulchat import config as _config  # noqa: F401
