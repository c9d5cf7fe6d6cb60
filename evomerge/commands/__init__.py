"""evomerge.commands"""
