import Foundation
import XCTest
@testable import PEADiffusion

/// Tiled VAE decoding (`AutoencoderKL.decodeTiled`, `pea generate --vae-tiling`) against diffusers' `enable_tiling()`
/// on the tiny SD1 VAE (tools/reference/make_vae_tiling_fixtures.py): tiles in one and both directions with a short
/// last tile, a batch of two, and a latent of one tile (decoded whole), within docs/testing.md's f32 tolerance.
final class VAETilingTests: XCTestCase {
    func testTiledDecodeMatchesDiffusers() throws {
        let backend = CPUBackend()
        let vae = try AutoencoderKL.load(folder: fixturesDirectory() + "/pipelines/sd1/vae", backend: backend).model
        XCTAssertEqual(vae.tileLatentSize, 16)
        let fixtures = try SafeTensorsFile(path: fixturesDirectory() + "/vae_tiling/cases.safetensors")
        for name in ["wide_and_tall", "batch_of_two", "one_tile"] {
            let latents = try backend.upload(fixtures.tensor("\(name).latents"))
            let expected = try fixtures.tensor("\(name).sample"), untiled = try fixtures.tensor("\(name).untiled")
            let tiled = try vae.decodeTiled(latents)
            XCTAssertEqual(tiled.shape, expected.shape, name)
            assertClose(try backend.downloadFloats(tiled), expected.floats(), .f32, "\(name): tiled decode")
            let seams = zip(expected.floats(), untiled.floats()).map { abs($0 - $1) }.max() ?? 0
            if name == "one_tile" {
                XCTAssertEqual(seams, 0, "a latent of one tile is decoded whole")
            } else {
                XCTAssertGreaterThan(seams, 0.1, "\(name): the fixture must tell tiled from untiled decoding")
            }
        }
    }

    func testGenerateWithVAETiling() throws {
        let sd1 = fixturesDirectory() + "/pipelines/sd1"
        let scratch = ScratchDirectory()
        let base = ["generate", "--model", sd1, "--prompt", "a lighthouse", "--steps", "2", "--seed", "4", "--width", "48",
                    "--height", "40", "--backend", "cpu"]
        let tiled = try runPea(base + ["--vae-tiling", "--output", scratch.file("tiled.png")])
        XCTAssertEqual(tiled.status, 0, tiled.stderr)
        let plain = try runPea(base + ["--output", scratch.file("plain.png")])
        XCTAssertEqual(plain.status, 0, plain.stderr)
        let a = try PNGReader.read(path: scratch.file("tiled.png")), b = try PNGReader.read(path: scratch.file("plain.png"))
        XCTAssertEqual([a.width, a.height], [48, 40])
        XCTAssertNotEqual(a.pixels, b.pixels, "a 48×40 image is three tiles of the fixture VAE: the seams are blended")
        XCTAssertTrue(try runPea(["generate", "--help"]).stdout.contains("--vae-tiling"))
        let huge = try runPea(["generate", "--model", sd1, "--prompt", "x", "--width", "65536", "--height", "65536",
                               "--output", scratch.file("huge.png")])
        XCTAssertNotEqual(huge.status, 0)
        XCTAssertTrue(huge.stderr.contains("--vae-tiling"), huge.stderr)
    }
}
