"""soulchat: fine-tune language models into empathetic counselors on packed multi-turn conversations."""

__version__ = "0.1.0"
