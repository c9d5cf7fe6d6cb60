"""evomerge.models"""
