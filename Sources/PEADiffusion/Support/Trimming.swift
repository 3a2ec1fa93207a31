extension String {
    /// Without leading and trailing whitespace (Unicode's, as Python's `str.strip()`), for lines of prompt files,
    /// captions and manifests.
    public func trimmingWhitespace() -> String {
        guard let first = firstIndex(where: { !$0.isWhitespace }), let last = lastIndex(where: { !$0.isWhitespace }) else { return "" }
        return String(self[first...last])
    }
}
