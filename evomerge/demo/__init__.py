"""evomerge.demo"""
