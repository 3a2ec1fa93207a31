#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// `x` through a printf format for one double ("%.3f", "%.3e"): Swift's description would print exponents
/// where a table wants fixed decimals, and vice versa.
func printfFormatted(_ format: String, _ x: Double) -> String {
    var buffer = [CChar](repeating: 0, count: 64)
    _ = withVaList([x]) { vsnprintf(&buffer, 64, format, $0) }
    return String(cString: buffer)
}

/// `x` rounded to `digits` decimals as printf rounds it, for JSON numbers that keep the precision a text
/// column shows.
func rounded(_ x: Double, _ digits: Int) -> Double {
    Double(printfFormatted("%.\(digits)f", x)) ?? x
}
