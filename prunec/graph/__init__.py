"""prunec.graph"""
