"""prunec.eval"""
