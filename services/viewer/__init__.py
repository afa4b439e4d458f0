"""The viewer service: joins frames with their emotion labels and shows them on a web page."""
