import Foundation
import XCTest
@testable import PEADiffusion

/// ImageResampling against Pillow itself (tools/reference/make_image_resampling_fixtures.py): Lanczos and
/// bilinear resizes and Gaussian blurs of RGB and L images, equal to the byte.
final class ImageResamplingTests: XCTestCase {
    struct Source { let pixels: [UInt8]; let channels, width, height: Int }

    func loadFixtures() throws -> (sources: [String: Source], cases: [[String: Any]], pixels: [UInt8]) {
        let directory = fixturesDirectory() + "/image_resampling"
        let pixels = try XCTUnwrap(readFileBytes(directory + "/pixels.bin"))
        let manifestBytes = try XCTUnwrap(readFileBytes(directory + "/cases.json"))
        let manifest = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(manifestBytes)) as? [String: Any])
        var sources: [String: Source] = [:]
        for entry in try XCTUnwrap(manifest["sources"] as? [[String: Any]]) {
            let channels = entry["mode"] as? String == "L" ? 1 : 3
            let width = try XCTUnwrap(entry["width"] as? Int), height = try XCTUnwrap(entry["height"] as? Int)
            let offset = try XCTUnwrap(entry["offset"] as? Int)
            sources[try XCTUnwrap(entry["name"] as? String)] = Source(
                pixels: Array(pixels[offset..<(offset + width * height * channels)]), channels: channels, width: width, height: height)
        }
        return (sources, try XCTUnwrap(manifest["cases"] as? [[String: Any]]), pixels)
    }

    func testResizeAndBlurEqualPillowBitForBit() throws {
        let (sources, cases, pixels) = try loadFixtures()
        XCTAssertGreaterThanOrEqual(cases.count, 20)
        for entry in cases {
            let source = try XCTUnwrap(sources[try XCTUnwrap(entry["source"] as? String)])
            let width = try XCTUnwrap(entry["width"] as? Int), height = try XCTUnwrap(entry["height"] as? Int)
            let offset = try XCTUnwrap(entry["offset"] as? Int)
            let expected = Array(pixels[offset..<(offset + width * height * source.channels)])
            let actual: [UInt8]
            let label: String
            if entry["op"] as? String == "resize" {
                let filter: ImageResampling.Filter = entry["filter"] as? String == "bilinear" ? .bilinear : .lanczos
                label = "\(entry["source"]!) \(filter) → \(width)×\(height)"
                actual = ImageResampling.resize(source.pixels, channels: source.channels, width: source.width, height: source.height,
                                                toWidth: width, toHeight: height, filter: filter)
            } else {
                let radius = try XCTUnwrap(entry["radius"] as? Double)
                label = "\(entry["source"]!) GaussianBlur(\(radius))"
                actual = ImageResampling.gaussianBlur(source.pixels, channels: source.channels, width: source.width,
                                                      height: source.height, radius: Float(radius))
            }
            XCTAssertEqual(actual.count, expected.count, label)
            let differences = zip(actual, expected).map { abs(Int($0) - Int($1)) }
            XCTAssertEqual(differences.max() ?? 0, 0, "\(label): \(differences.filter { $0 != 0 }.count) bytes differ")
        }
    }

    func testRGBImageEntryPointsMatchTheInterleavedOnes() throws {
        let (sources, _, _) = try loadFixtures()
        let source = try XCTUnwrap(sources["rgb37x29"])
        let image = RGBImage(width: source.width, height: source.height, pixels: source.pixels)
        XCTAssertEqual(ImageResampling.resize(image, width: 32, height: 24, filter: .lanczos).pixels,
                       ImageResampling.resize(source.pixels, channels: 3, width: 37, height: 29, toWidth: 32, toHeight: 24, filter: .lanczos))
        XCTAssertEqual(ImageResampling.resize(image, width: 37, height: 29, filter: .lanczos), image, "same size: a copy")
        XCTAssertEqual(ImageResampling.gaussianBlur(image, radius: 0), image, "radius 0: a copy")
    }
}
