#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import XCTest
@testable import PEADiffusion

/// Issue #16, "never crash, never hang, never lie": hostile sizes in files, special files where a regular
/// file is expected, a truncated CUDA library, unbounded text and requests too large to allocate are refused
/// with errors naming the file and the problem (one regression test per finding).
final class RobustnessLimitsTests: XCTestCase {

    // MARK: - Integer overflow in sizes read from files

    /// A tar member (pax `size`) of Int.max bytes: `dataStart + size` used to overflow and trap.
    func testTarMemberOfIntMaxBytesIsTruncationNotATrap() {
        var tar = TarBuilder()
        let record = "size=\(Int.max)\n"
        let length = record.utf8.count + 3   // "NN " + record, NN itself two digits
        tar.add(name: "pax", data: Array("\(length) \(record)".utf8), type: "x")
        tar.add(name: "a.txt", data: Array("caption".utf8))
        assertThrowsError(containing: ["huge.tar", "truncated", "declares \(Int.max) bytes"]) {
            try TarArchive(bytes: tar.finish(), path: "huge.tar").entries()
        }
    }

    func testCheckedSizeNamesWhatOverflowed() {
        func fail(_ reason: String) -> PEAError { .invalidFile(path: "f.bin", reason: reason) }
        XCTAssertEqual(try CheckedSize.product(6, 7, "x", fail: fail), 42)
        XCTAssertEqual(try CheckedSize.sum(6, 7, "x", fail: fail), 13)
        assertThrowsError(containing: ["f.bin", "the byte size overflows", "× 64"]) {
            try CheckedSize.product(1 << 60, 64, "the byte size", fail: fail)
        }
        assertThrowsError(containing: ["f.bin", "the end offset overflows"]) {
            try CheckedSize.sum(Int.max, 1, "the end offset", fail: fail)
        }
    }
}
