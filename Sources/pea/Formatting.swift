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

/// A duration as H:MM:SS, for ETAs ("?" when it cannot be told).
func clock(_ seconds: Double) -> String {
    guard seconds.isFinite, seconds >= 0, seconds < 1e9 else { return "?" }
    let s = Int(seconds.rounded())
    return "\(s / 3600):" + [s / 60 % 60, s % 60].map { $0 < 10 ? "0\($0)" : "\($0)" }.joined(separator: ":")
}
