"""prunec.report"""
