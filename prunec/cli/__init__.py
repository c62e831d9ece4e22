"""prunec.cli"""
