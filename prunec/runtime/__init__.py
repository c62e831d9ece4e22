"""prunec.runtime"""
