// Sizes computed from numbers a file declares. Swift traps on integer overflow, so a hostile or damaged file
// (a storage of 2^60 elements, a tar member of Int.max bytes) would crash Pea instead of being refused; every
// size the readers compute from file data goes through these, and overflow becomes an error naming what overflowed.

enum CheckedSize {
    /// `a * b`, or `fail("<what> overflows (a × b)")`.
    static func product(_ a: Int, _ b: Int, _ what: @autoclosure () -> String, fail: (String) -> PEAError) throws -> Int {
        let (value, overflow) = a.multipliedReportingOverflow(by: b)
        guard !overflow else { throw fail("\(what()) overflows (\(a) × \(b))") }
        return value
    }

    /// `a + b`, or `fail("<what> overflows (a + b)")`.
    static func sum(_ a: Int, _ b: Int, _ what: @autoclosure () -> String, fail: (String) -> PEAError) throws -> Int {
        let (value, overflow) = a.addingReportingOverflow(b)
        guard !overflow else { throw fail("\(what()) overflows (\(a) + \(b))") }
        return value
    }
}
