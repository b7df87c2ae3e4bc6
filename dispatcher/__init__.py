"""
dispatcher: a networked job dispatcher built on Twisted.
"""
