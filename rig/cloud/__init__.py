"""The local cloud stack: the RainMaker cloud's stand-in on this machine (DESIGN.md "Cloud")."""
