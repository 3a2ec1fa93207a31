// swift-tools-version:6.0
import PackageDescription

// No package dependencies: the Swift toolchain and the system's C libraries only.
// The C kernels are always optimised (-O3), also in debug builds, so that `swift test` exercises the same
// code paths and runs in reasonable time; SIMD variants are chosen at run time (see CKernels/cpu/gemm.c).
let package = Package(
    name: "Pea",
    products: [
        .library(name: "PEADiffusion", targets: ["PEADiffusion"]),
        .executable(name: "pea", targets: ["pea"]),
    ],
    targets: [
        .target(
            name: "CKernels",
            path: "CKernels",
            sources: ["cpu", "abi"],
            publicHeadersPath: "include",
            cSettings: [.unsafeFlags(["-O3", "-fno-math-errno", "-Wall", "-Wno-unused-function"])],
            linkerSettings: [.linkedLibrary("pthread"), .linkedLibrary("m")]
        ),
        .systemLibrary(
            name: "CZlib",
            path: "Sources/CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        .systemLibrary(
            name: "CJPEG",
            path: "Sources/CJPEG",
            pkgConfig: "libjpeg",
            providers: [.apt(["libjpeg-dev"])]
        ),
        .target(
            name: "PEADiffusion",
            dependencies: ["CKernels", "CZlib", "CJPEG"],
            path: "Sources/PEADiffusion"
        ),
        .executableTarget(
            name: "pea",
            dependencies: ["PEADiffusion"],
            path: "Sources/pea"
        ),
        .testTarget(
            name: "PEADiffusionTests",
            dependencies: ["PEADiffusion", "CKernels"],
            path: "Tests/PEADiffusionTests"
        ),
    ],
    swiftLanguageModes: [.v5]
)
