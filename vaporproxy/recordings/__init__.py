"""
Console recordings: the file format, the files and their index.
"""
