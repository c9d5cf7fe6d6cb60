"""evomerge.evaluate"""
